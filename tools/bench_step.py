"""Throughput of a config's train step: samples/s, step time, model FLOPs and MFU.

    python tools/bench_step.py --config configs/demo.py [--config.key=value ...]
        [--steps 20] [--warmup 3]

Builds the run as training does (`bigalign.build`), feeds one device-resident batch of
random inputs of the config's shapes (the input pipeline is tools/bench_input.py's
subject), compiles the step, and runs `--warmup` untimed then `--steps` timed steps,
each ended by `jax.block_until_ready` on the new state and metrics. It prints:

- samples/s and the step time (median, 10th and 90th percentile);
- the model FLOPs of one step (`Run.flops_per_step`: matmuls of forward and
  backward, recomputation not counted) and the rate they run at;
- the machine's matmul peak measured in this run (float32 and bf16, one device), the
  datasheet bf16 peak on GPUs and TPUs, and MFU against each. On CPU the simulated
  devices share the host's cores, so the peak is the host's, not per device;
- the step's matmuls and convolutions (forward and backward, as its jaxpr has them),
  each shape timed alone on one device: the most that removing every other cost
  could reach, and the MFU ceiling it implies for this model's shapes (one device);
- steps/s when the host waits for every step (as a loop that logs every step) and when
  it only waits at the end (as one that logs every 100): the cost of a host sync.

The step's compiled memory (temporaries and arguments per device) is printed too.
"""

import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bigalign  # noqa: E402
from bigalign.metrics import markdown_table  # noqa: E402
from machine_peak import describe_peaks, products_alone  # noqa: E402

MIB = 2**20


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_steps(step, state, batch, count: int, *, wait_every_step: bool):
    """Runs `count` steps; returns (the state, per-step seconds or one total)."""
    times = []
    start = time.perf_counter()
    for _ in range(count):
        state, metrics = step(state, batch)
        if wait_every_step:
            jax.block_until_ready((state, metrics))
            now = time.perf_counter()
            times.append(now - start)
            start = now
    jax.block_until_ready(state)
    return state, times if wait_every_step else [time.perf_counter() - start]


def bench(config, steps: int, warmup: int) -> str:
    run = bigalign.build(config)
    batch = run.global_batch(run.random_batch(np.random.default_rng(0)))
    state = run.init_state()
    start = time.perf_counter()
    compiled = run.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state, _ = time_steps(compiled, state, batch, warmup, wait_every_step=True)
    state, times = time_steps(compiled, state, batch, steps, wait_every_step=True)
    state, (pipelined,) = time_steps(compiled, state, batch, steps, wait_every_step=False)
    peaks = describe_peaks()
    alone, product_flops, count = products_alone(run.train_step, state, batch)

    median = statistics.median(times)
    rate = run.flops_per_step / median
    devices = jax.device_count()
    on_cpu = jax.default_backend() == "cpu"
    peak_devices = 1 if on_cpu else devices  # simulated CPU devices share one host
    rows = [
        ["samples/s", f"{config.batch_size / median:,.1f}"],
        ["step time median (p10-p90)",
         f"{median * 1e3:.1f} ms ({percentile(times, 10) * 1e3:.1f}-{percentile(times, 90) * 1e3:.1f})"],
        ["model TFLOPs per step", f"{run.flops_per_step / 1e12:.4g}"],
        ["model TFLOP/s", f"{rate / 1e12:.4g}"],
    ]
    for name, peak in peaks.items():
        if peak:
            label = f"{name} matmul peak" + (" (datasheet)" if name.startswith("published") else
                                             " (measured, 1 device)")
            rows.append([label, f"{peak / 1e12:.4g} TFLOP/s"])
            rows.append([f"MFU vs {name}", f"{rate / (peak * peak_devices):.3f}"])
    rows += [
        [f"the step's {count} products timed alone", f"{alone * 1e3:.1f} ms"],
        ["their TFLOPs (XLA's count; the model's above)", f"{product_flops / 1e12:.4g}"],
        ["step time / products alone", f"{median / alone:.2f}"],
    ]
    for name, peak in peaks.items():
        if peak:
            rows.append([f"MFU ceiling vs {name} (products alone)",
                         f"{run.flops_per_step / alone / (peak * peak_devices):.3f}"])
    rows += [
        # both over all steps (the median above leaves the slow ones out)
        ["steps/s, host waits every step", f"{steps / sum(times):.3f}"],
        ["steps/s, host waits at the end", f"{steps / pipelined:.3f}"],
        ["compile s", f"{compile_seconds:.1f}"],
        ["temp MiB / device", f"{memory.temp_size_in_bytes / MIB:.1f}"],
        ["arguments MiB / device", f"{memory.argument_size_in_bytes / MIB:.1f}"],
    ]
    header = (f"{devices} {jax.devices()[0].device_kind} device(s), jax {jax.__version__}, "
              f"global batch {config.batch_size}, {steps} timed steps after {warmup}")
    return header + "\n\n" + markdown_table(["quantity", "value"], rows)


def main(argv) -> None:
    from absl import flags

    del argv
    print("$ python tools/bench_step.py " + " ".join(sys.argv[1:]), flush=True)
    print(bench(flags.FLAGS.config, flags.FLAGS.steps, flags.FLAGS.warmup))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from bigalign import host_memory

    host_memory.use_huge_pages()  # as the trainer runs
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    flags.DEFINE_integer("steps", 20, "Timed steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
