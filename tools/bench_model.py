"""Benchmark the model-scaling options of the train step: FSDP, remat, scan_layers, bf16.

Every row compiles and runs the full train step (towers, loss, backward, AdamW) of
one model at one global batch, changing one option of the baseline (data-parallel
mesh, float32, no remat, no scan) or, in the last rows, several at once:

    baseline             mesh (data=all, fsdp=1)
    fsdp                 mesh (data=1, fsdp=all): parameters and moments split over all devices
    fsdp2d               mesh (data=2, fsdp=all/2), with 4 or more devices
    remat_full           model.remat="full": each block recomputed in the backward pass
    remat_dots_no_batch  model.remat="dots_no_batch": keep weight matmul outputs, recompute the rest
    scan                 model.scan_layers=True: one lax.scan over the stacked blocks
    scan_remat_full      scan + remat_full (XLA:CPU drops the memory saving of remat without scan)
    bf16                 model.compute_dtype="bfloat16" (float32 parameters and optimizer state)
    patch_dropout        model.image.patch_dropout=0.5 (FLIP): the image tower trains on half its patches
    combined             fsdp + remat_full + scan + bf16

Per row it reports:
- compile time of `step.lower(state, batch).compile()`;
- step time: median of `--steps` timed steps after `--warmup` untimed ones, each ended
  by `jax.block_until_ready` on the new state and the metrics. The rows take their
  steps in turn (round-robin), so load from other processes hits all rows alike and
  the ratios stay meaningful on a shared machine; `--sequential` times each row on its
  own instead, holding one row's state at a time (less memory);
- model TFLOP/s per device: `Run.flops_per_step` (matmuls of forward and backward,
  recomputation not counted) / step time / devices;
- state bytes per device: the train state's (parameters, optimizer moments, step, RNG)
  shards that live on the first device;
- temp bytes per device: `compiled.memory_analysis().temp_size_in_bytes`, the scratch
  (activations kept for the backward pass, gathered weights, gradients, optimizer
  temporaries) one device needs;
- the ratios of both memories and of the step time to the baseline row, which always runs;
- the loss of the first step, as a check that the rows compute the same thing: rows
  with the same parameter layout start from the same parameters and agree (bf16 within
  a few 1e-3); scanned rows initialise their stacked blocks from other random draws.

    python tools/bench_model.py --size Ti/16 --image-size 224 --batch-size 32 --steps 5
    python tools/bench_model.py --rows baseline,fsdp,combined

On a CPU the script simulates 8 devices: it adds
`--xla_force_host_platform_device_count=8` to XLA_FLAGS before jax is imported unless
XLA_FLAGS already sets a count. The flag only affects the host (CPU) platform, so on a
GPU or TPU machine the real devices are used. Timings of simulated devices share the
host's cores and say little about accelerator speed; the memory columns are what the
compiler plans per device.
"""

import os

SIMULATED_CPU_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={SIMULATED_CPU_DEVICES}"
    ).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402  (must come after XLA_FLAGS)
import numpy as np  # noqa: E402

import bigalign  # noqa: E402
from bigalign.builder import step_flops  # noqa: E402
from bigalign.metrics import markdown_table  # noqa: E402
from bench_configs import sized_config  # noqa: E402  (tools/ is on sys.path)

MIB = 2**20


def row_overrides(num_devices: int) -> dict[str, dict]:
    """Row name -> the config overrides (dotted key -> value) that make it from the baseline."""
    fsdp_all = {"mesh.data": 1, "mesh.fsdp": num_devices}
    remat_full = {"model.remat": "full"}
    scan = {"model.scan_layers": True}
    bf16 = {"model.compute_dtype": "bfloat16"}
    rows = {
        "baseline": {},
        "fsdp": fsdp_all,
        "fsdp2d": {"mesh.data": 2, "mesh.fsdp": num_devices // 2},
        "remat_full": remat_full,
        "remat_dots_no_batch": {"model.remat": "dots_no_batch"},
        "scan": scan,
        "scan_remat_full": {**scan, **remat_full},
        "bf16": bf16,
        "patch_dropout": {"model.image.patch_dropout": 0.5},
        "combined": {**fsdp_all, **remat_full, **scan, **bf16},
    }
    if num_devices < 4:  # a 2-D mesh needs data=2 and fsdp >= 2
        del rows["fsdp2d"]
    if num_devices < 2:  # fsdp over one device is the baseline
        del rows["fsdp"], rows["combined"]
    return rows


def base_config(args):
    """The baseline: `--size` for both towers (the text tower takes its name without the patch)."""
    return sized_config(
        args.size, batch_size=args.batch_size, image_size=args.image_size,
        max_len=args.max_len, vocab_size=args.vocab_size, embed_dim=args.embed_dim,
    )


def bytes_on_device(tree, device) -> int:
    """Bytes of the shards of `tree`'s arrays that live on `device`."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


@dataclasses.dataclass
class Row:
    """One compiled variant: its live train state and what was measured of it."""

    config: Any
    mesh_shape: tuple[int, int]  # (data, fsdp)
    num_devices: int
    compiled: Any  # the compiled train step; None once released
    state: Any
    batch: dict
    num_params: int
    flops_per_step: int  # model FLOPs of one train step
    compile_s: float
    state_bytes: int  # per device
    temp_bytes: int  # per device
    first_loss: float | None = None  # of the first step taken
    step_times: list = dataclasses.field(default_factory=list)

    def step(self) -> float:
        """Runs one train step (donating the old state); returns its wall time in seconds."""
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - start
        if self.first_loss is None:
            self.first_loss = float(metrics["train/loss"])
        return seconds

    def release(self):
        """Drops the state and executable so their memory can be reused."""
        self.compiled = self.state = self.batch = None

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times)

    @property
    def flops_per_device_per_s(self) -> float:
        return self.flops_per_step / self.step_s / self.num_devices


def prepare_row(config) -> Row:
    """Builds the run of `config`, its state and a random batch, and compiles its train step."""
    run = bigalign.build(config)
    mesh = run.mesh
    state = run.init_state()
    batch = run.global_batch(run.random_batch(np.random.default_rng(0)))
    step = run.train_step

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    return Row(
        config=config,
        mesh_shape=tuple(mesh.shape.values()),
        num_devices=mesh.size,
        compiled=compiled,
        state=state,
        batch=batch,
        num_params=sum(x.size for x in jax.tree.leaves(state.params)),
        flops_per_step=run.flops_per_step,
        compile_s=compile_s,
        state_bytes=bytes_on_device(state, mesh.devices.flat[0]),
        temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
    )


def time_rows(rows: list[Row], *, steps: int, warmup: int) -> None:
    """Round-robin: each round runs one step of every row; rounds after `warmup` are timed."""
    for round_index in range(warmup + steps):
        for row in rows:
            seconds = row.step()
            if round_index >= warmup:
                row.step_times.append(seconds)


def format_table(rows: dict[str, Row]) -> str:
    """An aligned table (also valid markdown), ratios against the "baseline" row."""
    base = rows["baseline"]
    header = [
        "row", "mesh (data x fsdp)", "compile s", "step ms", "TFLOP/s per device",
        "state MiB per device", "temp MiB per device", "state vs baseline",
        "temp vs baseline", "time vs baseline", "step-1 loss",
    ]
    lines = [
        [
            name,
            f"{row.mesh_shape[0]} x {row.mesh_shape[1]}",
            f"{row.compile_s:.1f}",
            f"{row.step_s * 1e3:.0f}",
            f"{row.flops_per_device_per_s / 1e12:.4f}",
            f"{row.state_bytes / MIB:.1f}",
            f"{row.temp_bytes / MIB:.1f}",
            f"{row.state_bytes / base.state_bytes:.3f}",
            f"{row.temp_bytes / base.temp_bytes:.3f}",
            f"{row.step_s / base.step_s:.2f}",
            f"{row.first_loss:.5f}",
        ]
        for name, row in rows.items()
    ]
    return markdown_table(header, lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="Ti/16",
                        help="image tower variant (e.g. Ti/16, B/16); the text tower gets "
                             "the same size without the patch (Ti, B)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-len", type=int, default=32, help="text tokens per example")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--embed-dim", type=int, default=512, help="shared embedding width")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, every row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    parser.add_argument("--rows", default="",
                        help="comma-separated subset of the rows (baseline always runs)")
    parser.add_argument("--sequential", action="store_true",
                        help="time each row right after compiling it and free it before the "
                             "next: one state in memory at a time, but exposed to load changes")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def describe_setup(args, base, rows: dict[str, Row], load_before: float) -> str:
    """Two lines: the devices and host, then the model, batch and timing method."""
    devices = jax.devices()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    timing = "each row on its own" if args.sequential else "rows in turn"
    step_tflops = step_flops(base, args.vocab_size) / 1e12
    return (
        f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}) devices, "
        f"{os.cpu_count()} host cores, jax {jax.__version__}; load average {load_before:.1f} "
        f"before the run; peak RSS {peak_rss_mib:.0f} MiB.\n"
        f"Model: image {args.size} at {args.image_size} px, text {base.model.text.variant} "
        f"(max_len {args.max_len}, vocab {args.vocab_size}), embed_dim {args.embed_dim}; "
        f"{rows['baseline'].num_params / 1e6:.1f}M parameters; {base.loss.name} loss; global "
        f"batch {args.batch_size}; {step_tflops:.3f} model TFLOPs per step; median of "
        f"{args.steps} steps after {args.warmup} warm-up ({timing})."
    )


def main():
    args = parse_args()
    print("$ python tools/bench_model.py " + shlex.join(sys.argv[1:]), flush=True)
    devices = jax.devices()
    overrides = row_overrides(len(devices))
    chosen = [name for name in args.rows.split(",") if name] or list(overrides)
    unknown = [name for name in chosen if name not in overrides]
    if unknown:
        sys.exit(f"bench_model: unknown rows {unknown}; valid with {len(devices)} devices: "
                 f"{', '.join(overrides)}")
    chosen = ["baseline"] + [name for name in chosen if name != "baseline"]

    base = base_config(args)
    load_before = os.getloadavg()[0]
    rows = {}
    for name in chosen:
        config = base.copy_and_resolve_references()
        config.update_from_flattened_dict(overrides[name])
        row = rows[name] = prepare_row(config)
        print(f"{name}: compiled in {row.compile_s:.1f} s; state {row.state_bytes / MIB:.1f} "
              f"MiB, temp {row.temp_bytes / MIB:.1f} MiB per device", file=sys.stderr, flush=True)
        if args.sequential:
            time_rows([row], steps=args.steps, warmup=args.warmup)
            row.release()
    if not args.sequential:
        time_rows(list(rows.values()), steps=args.steps, warmup=args.warmup)

    print("\n" + describe_setup(args, base, rows, load_before) + "\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
