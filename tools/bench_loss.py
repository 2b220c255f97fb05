"""Benchmark the contrastive losses on a simulated 8-device CPU mesh, or on the accelerators.

For every global batch and variant it measures a jitted forward + backward
(``jax.value_and_grad`` w.r.t. x, y, scale and bias): the per-device temporary
buffer size from the compiled executable's ``memory_analysis()``, the process peak
RSS, and the median time of ``--repeats`` runs after one warm-up.

Each lean variant runs in one subprocess together with its all-gather counterpart
(softmax_tiled with softmax, sigmoid_chunked with sigmoid):
- lean first, so its peak RSS (read right after its warm-up) is not inflated by the
  all-gather one; the all-gather RSS includes the lean variant's few MiB;
- timed runs alternate between the two, so that load from other processes on a
  shared machine hits both alike and the time ratio stays meaningful.
A variant whose predicted memory (per-device temp + arguments + outputs, times the
device count) exceeds ``--memory-limit-gib`` is reported as "OOM/skipped".

    python tools/bench_loss.py --batch-sizes 1024,4096,16384 --dim 512

Prints a markdown table on stdout and one JSON line per measurement on stderr.
"""

import os
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from bigalign import losses  # noqa: E402

ALL_GATHER_COUNTERPART = {"softmax_tiled": "softmax", "sigmoid_chunked": "sigmoid"}
MIB = 2**20


def _available_gib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _default_memory_limit_gib() -> float:
    """85% of free host memory for the simulated CPU devices together; 90% of one
    accelerator's memory for each of its devices."""
    if jax.default_backend() == "cpu":
        return round(0.85 * _available_gib(), 1)
    return round(0.9 * jax.devices()[0].memory_stats()["bytes_limit"] / 2**30, 1)


def _fits(per_device_bytes: int, limit_gib: float) -> bool:
    devices = DEVICES if jax.default_backend() == "cpu" else 1  # CPU devices share the host
    return per_device_bytes * devices / 2**30 <= limit_gib


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _inputs(batch, dim, mesh):
    rows = NamedSharding(mesh, P("data", None))

    @jax.jit(out_shardings=rows)
    def unit_rows(key):
        a = jax.random.normal(key, (batch, dim))
        return a / jnp.linalg.norm(a, axis=-1, keepdims=True)

    x, y = (unit_rows(k) for k in jax.random.split(jax.random.key(0), 2))
    return x, y, jnp.float32(10.0), jnp.float32(-10.0)


def measure_group(names, batch, dim, repeats, tile_size, memory_limit_gib) -> list[dict]:
    """Measures ``names`` (lean first) in this process; returns JSON-able rows."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    args = _inputs(batch, dim, mesh)
    rows, runnable = [], {}
    for name in names:
        def loss(x, y, scale, bias, name=name):
            return losses.compute(name, x, y, scale=scale, bias=bias, mesh=mesh,
                                  tile_size=tile_size)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
        memory = compiled.memory_analysis()
        row = {"variant": name, "batch": batch, "temp_mib": memory.temp_size_in_bytes / MIB}
        per_device = sum((memory.temp_size_in_bytes, memory.argument_size_in_bytes,
                          memory.output_size_in_bytes))
        if not _fits(per_device, memory_limit_gib):
            rows.append(row | {"status": "OOM/skipped"})
            continue
        jax.block_until_ready(compiled(*args))  # warm-up
        rows.append(row | {"status": "ok", "peak_rss_mib": _peak_rss_mib(), "times": []})
        runnable[name] = (compiled, rows[-1])

    for _ in range(repeats):  # interleaved, so both variants see the same machine load
        for compiled, row in runnable.values():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            row["times"].append(time.perf_counter() - start)
    for _, row in runnable.values():
        times = row.pop("times")
        row.update(seconds=statistics.median(times), min_seconds=min(times))
    return rows


def groups(variants):
    """Lean variants with their all-gather counterpart (if selected), lean first."""
    out, seen = [], set()
    for name in variants:
        if name in seen:
            continue
        partner = ALL_GATHER_COUNTERPART.get(name) or next(
            (lean for lean, gathered in ALL_GATHER_COUNTERPART.items() if gathered == name), None)
        group = [name] + ([partner] if partner in variants else [])
        group.sort(key=lambda n: n not in ALL_GATHER_COUNTERPART)  # lean first
        out.append(group)
        seen.update(group)
    return out


def measure_in_subprocess(args, names, batch) -> list[dict]:
    command = [
        sys.executable, __file__, "--single", ",".join(names), "--batch-sizes", str(batch),
        "--dim", str(args.dim), "--repeats", str(args.repeats),
        "--memory-limit-gib", str(args.memory_limit_gib),
    ] + (["--tile-size", str(args.tile_size)] if args.tile_size else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        status = "OOM/killed" if done.returncode in (-9, 137) else f"failed ({done.returncode})"
        print(done.stderr[-2000:], file=sys.stderr)
        return [{"variant": name, "batch": batch, "status": status} for name in names]
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    by_key = {(r["variant"], r["batch"]): r for r in results}
    lines = [
        "| global batch | variant | fwd+bwd time, median (min) s | temp memory / device (MiB) "
        "| peak RSS (MiB) | time vs all-gather | temp memory vs all-gather |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        time_ratio = memory_ratio = "-"
        other = by_key.get((ALL_GATHER_COUNTERPART.get(r["variant"]), r["batch"]))
        if other and "seconds" in r and "seconds" in other:
            time_ratio = f"{r['seconds'] / other['seconds']:.2f}x"
        if other and "temp_mib" in r and "temp_mib" in other:
            memory_ratio = f"1/{other['temp_mib'] / r['temp_mib']:.1f}"
        status = "" if r.get("status") == "ok" else f" ({r['status']})"
        seconds = f"{r['seconds']:.3f} ({r['min_seconds']:.3f})" if "seconds" in r else "-"
        temp = f"{r['temp_mib']:.1f}" if "temp_mib" in r else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-"
        lines.append(f"| {r['batch']} | {r['variant']}{status} | {seconds} | {temp} | {rss} "
                     f"| {time_ratio} | {memory_ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1024,2048,4096,8192,16384",
                        help="comma-separated global batch sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--variants", default=",".join(losses.NAMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=None,
                        help="logits tile width of the ring variants (default: DEFAULT_TILE)")
    parser.add_argument("--memory-limit-gib", type=float, default=_default_memory_limit_gib(),
                        help="skip variants predicted to need more memory than this: all "
                        "simulated CPU devices together, or one accelerator")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one group, one batch
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    if args.single:
        print(json.dumps(measure_group(args.single.split(","), batches[0], args.dim, args.repeats,
                                       args.tile_size, args.memory_limit_gib)))
        return

    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(losses.NAMES))
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(losses.NAMES)}")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} "
          f"{jax.devices()[0].device_kind} devices, "
          f"D={args.dim}, repeats={args.repeats}, memory limit {args.memory_limit_gib} GiB, "
          f"jax {jax.__version__}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    results = []
    for batch in batches:
        for group in groups(variants):
            for row in measure_in_subprocess(args, group, batch):
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
    print(table(results))


if __name__ == "__main__":
    main()
