"""Benchmark GradCache: train-step memory and time against grad_cache.num_chunks.

On a simulated 8-device CPU mesh it compiles the full train step (forward, loss,
backward, AdamW update) of a moderately sized CLIP/SigLIP model once per value of
``grad_cache.num_chunks`` and reports, per variant:
- the per-device temporary buffer size from the compiled executable's
  ``memory_analysis()`` (activations and other scratch; parameters, optimizer state
  and the batch are arguments, not temporaries),
- the median step time of ``--repeats`` runs after one warm-up. Timed runs go round
  the variants in turn, so load from other processes on a shared machine hits all
  of them alike and the ratios, taken within this one run, stay meaningful.

    python tools/bench_grad_cache.py --batch-size 512 --chunks 1,2,4,8

Prints the command and a markdown table on stdout.
"""

import os
import shlex
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bigalign  # noqa: E402
from bigalign import config as config_lib  # noqa: E402

MIB = 2**20


def bench_config(args):
    """The base config with larger towers: ViT and text Transformer, width 256, depth 4."""
    config = config_lib.base_config()
    config.batch_size = args.batch_size
    config.loss.name = args.loss
    config.data.image_size = args.image_size
    config.model.embed_dim = 256
    config.model.image.patch_size = args.patch_size
    for tower in (config.model.image, config.model.text):
        tower.width, tower.depth, tower.num_heads = args.width, args.depth, 4
        tower.mlp_dim = 4 * args.width
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--chunks", default="1,2,4,8", help="grad_cache.num_chunks values")
    parser.add_argument("--loss", default="sigmoid")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    chunk_counts = [int(c) for c in args.chunks.split(",")]

    print("$ python tools/bench_grad_cache.py " + shlex.join(sys.argv[1:]), flush=True)
    config = bench_config(args)
    batch = num_params = None  # the same for every num_chunks: taken from the first run

    steps, states, temp_mib, compile_s = {}, {}, {}, {}
    for num_chunks in chunk_counts:
        variant = config.copy_and_resolve_references()
        variant.grad_cache.num_chunks = num_chunks
        run = bigalign.build(variant)  # validates the config
        state = run.init_state()  # the same parameters for every variant (config.seed)
        if batch is None:
            batch = run.global_batch(run.random_batch(np.random.default_rng(0)))
            num_params = sum(x.size for x in jax.tree.leaves(state.params))
        start = time.perf_counter()
        steps[num_chunks] = run.train_step.lower(state, batch).compile()
        compile_s[num_chunks] = time.perf_counter() - start
        temp_mib[num_chunks] = steps[num_chunks].memory_analysis().temp_size_in_bytes / MIB
        states[num_chunks] = state  # each step donates its input: one state per variant
        print(f"compiled num_chunks={num_chunks} in {compile_s[num_chunks]:.1f} s: "
              f"temp {temp_mib[num_chunks]:.1f} MiB per device", file=sys.stderr, flush=True)

    times = {n: [] for n in chunk_counts}
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up
        for num_chunks in chunk_counts:
            start = time.perf_counter()
            states[num_chunks], metrics = steps[num_chunks](states[num_chunks], batch)
            jax.block_until_ready(metrics)
            if round_index:
                times[num_chunks].append(time.perf_counter() - start)

    per_device = config.batch_size // DEVICES
    print(f"\n{DEVICES} simulated CPU devices ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), jax {jax.__version__}; loss {args.loss}; global batch "
          f"{config.batch_size} ({per_device} per device); ViT {args.image_size}px/patch "
          f"{args.patch_size} and text Transformer (max_len {config.text.max_len}), width "
          f"{args.width}, depth {args.depth}; {num_params / 1e6:.1f}M parameters; median of "
          f"{args.repeats} steps after a warm-up.\n")
    print("| num_chunks | rows per chunk per device | temp MiB per device | temp vs 1 "
          "| step time (s) | time vs 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = chunk_counts[0]
    for n in chunk_counts:
        median = statistics.median(times[n])
        base_median = statistics.median(times[base])
        print(f"| {n} | {per_device // n} | {temp_mib[n]:.1f} | {temp_mib[n] / temp_mib[base]:.2f} "
              f"| {median:.2f} | {median / base_median:.2f} |")


if __name__ == "__main__":
    main()
