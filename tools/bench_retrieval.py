"""Benchmark retrieval at scale: device top-k in query blocks against the old host argsort.

Why: issue 15 moved retrieval's ranking onto the devices (`evaluators.ranking`), so host
memory grows with N, not N^2. What: the `retrieval` evaluator (recall@1/5/10 both ways,
match="owner") on N random unit embeddings per side (demo embed_dim, seed 0) on the
8-device simulated CPU mesh, against the old way in the same run: a numpy [N, N]
similarity and `np.argsort(-similarity, axis=1, kind="stable")[:, :k]`, once per
direction (the old code sorted once per k). Each (N, method) runs in a fresh subprocess;
its peak RSS growth is the RSS high-water mark (VmHWM, reset after setup) minus the RSS
after setup. Baselines not in --baseline-sizes are not run: their memory is the estimate
N^2 x (4 + 8) bytes. Once, end to end: the demo config's untrained model embeds N shapes
held-out examples and the evaluator ranks them, compilation included. The float32
matmul peak ([4096, 4096]^2, rows over the mesh, best of 5) is measured in the run.

    python tools/bench_retrieval.py --sizes 10000,40000 --baseline-sizes 10000 --e2e-size 10000
"""

import os
import sys

DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402  (configs/demo.py)

import bigalign  # noqa: E402
from bigalign import evaluators, sharding  # noqa: E402
from bigalign.data import held_out  # noqa: E402
from bigalign.evaluators import retrieval  # noqa: E402
from bigalign.metrics import markdown_table  # noqa: E402

MB = 1e6


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024 / MB


def reset_peak_rss() -> float:
    """Resets the RSS high-water mark (VmHWM) to the RSS now, and returns it. Not ru_maxrss:
    a subprocess's starts at its parent's RSS (kept over exec) and cannot be reset."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear_refs:
        clear_refs.write("5")
    return _status_mb("VmRSS:")


def matmul_peak_flops(mesh, size: int = 4096, repeats: int = 5) -> float:
    """Best float32 FLOP/s of a [size, size] @ [size, size] matmul, rows split over `mesh`."""
    x = sharding.shard_rows(np.random.default_rng(0).standard_normal((size, size), np.float32), mesh)
    y = jax.device_put(jnp.ones((size, size), jnp.float32), sharding.replicated(mesh))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(x, y))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(x, y))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class GivenPairs:
    """The part of `evaluators.Context` the retrieval evaluator reads: a mesh and one
    embedded set (here given, not embedded from held-out data)."""

    def __init__(self, mesh, embedded):
        self.mesh, self.embedded = mesh, embedded

    def pairs(self, spec: str = "", *, all_captions: bool = False):
        return self.embedded


def host_argsort_recalls(a: np.ndarray, b: np.ndarray, recall_at) -> dict:
    """The old evaluator: full [N, N] similarity on the host, stable argsort per direction."""
    groups = np.arange(len(a))
    similarity = a @ b.T
    results = {}
    for name, sim in (("image2text", similarity), ("text2image", similarity.T)):
        hit = groups[np.argsort(-sim, axis=1, kind="stable")[:, : max(recall_at)]] == groups[:, None]
        for k in recall_at:
            results[f"{name}_recall@{k}"] = float(np.mean(hit[:, :k].any(axis=1)))
    return results


def demo_config(num_eval: int):
    config = demo.get_config()
    config.data.num_eval = num_eval
    return config


def measure(method: str, n: int, repeats: int) -> dict:
    """One (method, N) in this process: seconds, first-call seconds, RSS growth, recalls."""
    if method == "e2e":  # embed N held-out shapes with the untrained demo model, then rank
        config = demo_config(n)
        with tempfile.TemporaryDirectory() as workdir:
            run = bigalign.build(config, workdir)  # trains the shapes tokenizer there
        context = evaluators.Context(run, run.init_state().params)
        base = reset_peak_rss()
        start = time.perf_counter()
        context.pairs()
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        recalls = retrieval.retrieval(context, config.evals.retrieval)
        rank_s = time.perf_counter() - start
        return {"seconds": embed_s + rank_s, "embed_s": embed_s, "rank_s": rank_s,
                "rss_growth_mb": _status_mb("VmHWM:") - base, "recalls": recalls}
    mesh = bigalign.build(demo_config(1000)).mesh
    rng = np.random.default_rng(0)
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in
            rng.standard_normal((2, n, demo.get_config().model.embed_dim), np.float32))
    options = evaluators.entry("retrieval", match="owner")
    embedded = held_out.EmbeddedSet(spec="random", count=n, embeddings={"image": a, "text": b},
                                    caption_owner=np.arange(n))
    evaluate = ((lambda: retrieval.retrieval(GivenPairs(mesh, embedded), options)) if method == "device"
                else (lambda: host_argsort_recalls(a, b, options.recall_at)))
    base = reset_peak_rss()
    times = []
    for _ in range(1 + (repeats if method == "device" else 0)):  # the device's first call compiles
        start = time.perf_counter()
        recalls = evaluate()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times[1:] or times), "first_s": times[0],
            "rss_growth_mb": _status_mb("VmHWM:") - base, "recalls": recalls}


def in_subprocess(method: str, n: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--single", f"{method}:{n}", "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        return {"status": "OOM/killed" if done.returncode in (-9, 137) else f"failed ({done.returncode})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,40000", help="comma-separated N")
    parser.add_argument("--baseline-sizes", default="10000",
                        help="the N at which the host argsort runs (others: memory estimate)")
    parser.add_argument("--e2e-size", type=int, default=10000, help="0: no end-to-end row")
    parser.add_argument("--repeats", type=int, default=1, help="timed device calls after the first")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: "method:N"
    args = parser.parse_args()
    if args.single:
        method, n = args.single.split(":")
        print(json.dumps(measure(method, int(n), args.repeats)))
        return

    print("$ python tools/bench_retrieval.py " + shlex.join(sys.argv[1:]), flush=True)
    load = os.getloadavg()[0]
    mesh = bigalign.build(demo_config(1000)).mesh
    peak = matmul_peak_flops(mesh)
    embed_dim = demo.get_config().model.embed_dim
    baseline_sizes = {int(n) for n in args.baseline_sizes.split(",") if n}
    rows = []

    def row(n, method, result, key, *, first="-", ratio="-", rss=True, same="-"):
        if key not in result:  # the subprocess failed: its status instead of numbers
            return [f"{n}", f"{method} ({result.get('status')})", *"-----"]
        growth = f"{result['rss_growth_mb']:.0f}" if rss else "-"
        return [f"{n}", method, f"{result[key]:.2f}", first, ratio, growth, same]

    for n in (int(n) for n in args.sizes.split(",")):
        base = in_subprocess("host", n, args.repeats) if n in baseline_sizes else None
        device = in_subprocess("device", n, args.repeats)
        print(json.dumps({"n": n, "host": base, "device": device}), file=sys.stderr, flush=True)
        if base is None:
            rows.append([f"{n}", "host argsort (old), not run", "-", "-", "-",
                         f"~{n * n * (4 + 8) / MB:.0f} (estimate N^2 x 12 B)", "-"])
        else:
            rows.append(row(n, "host argsort (old)", base, "seconds", ratio="1.00"))
        both = base and "seconds" in base and "seconds" in device
        rows.append(row(n, "device top_k (retrieval evaluator)", device, "seconds",
                        first=f"{device.get('first_s', 0):.2f}",
                        ratio=f"{device['seconds'] / base['seconds']:.3f}" if both else "-",
                        same=("yes" if base["recalls"] == device["recalls"] else "NO") if both else "-"))
        if "seconds" in device:  # the [N, N] dot products, both directions
            print(f"N={n}: device similarities at {4 * n * n * embed_dim / device['seconds'] / 1e9:.1f}"
                  " GFLOP/s", file=sys.stderr)
    if args.e2e_size:
        e2e = in_subprocess("e2e", args.e2e_size, args.repeats)
        print(json.dumps({"e2e": e2e}), file=sys.stderr, flush=True)
        rows += [row(args.e2e_size, "demo model: embed (image + text)", e2e, "embed_s", rss=False),
                 row(args.e2e_size, "demo model: rank (retrieval evaluator)", e2e, "rank_s", rss=False),
                 row(args.e2e_size, "demo model: embed + rank", e2e, "seconds")]
    devices = jax.devices()
    print(f"\n{len(devices)} x {devices[0].platform} devices, {os.cpu_count()} host cores, "
          f"jax {jax.__version__}, E={embed_dim}, load average {load:.1f} before the run; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (float32 4096^3, rows over the mesh, best of 5).\n")
    print(markdown_table(["N", "method", "seconds", "first call s", "time vs baseline",
                          "peak RSS growth (MB)", "recalls = baseline"], rows))


if __name__ == "__main__":
    main()
