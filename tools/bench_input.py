"""Benchmark the training input pipeline against the train step it has to feed.

Does the data loader keep up with the accelerator? The script answers it for one
machine, with a synthetic but photo-like image-text dataset written once into
`--workdir` (reused by later runs with the same `--num-images`):
- JPEG files (quality 90, sides 300 to 640 px, smooth colour blobs, a gradient and
  fine grain: about 60 KB each, like web photos of that size) with captions of 8 to
  20 random words, listed in a CSV index (the "csv:" source);
- the same pairs converted to ArrayRecord shards (the "array_record:" source);
- a sentencepiece tokenizer trained on the captions.

It then measures, in examples per second:
- the pipeline, `pipeline.train_dataset` (decode, random-resized crop and flip,
  batching, tokenizing, normalising), for each source and each worker count in
  `--num-workers` (0: one background thread): `--batches` batches timed after a
  warm-up of `--warmup` batches per producer (the thread or each worker), which
  covers the start of the worker processes;
- the train step of `--model` (both towers, sigmoid loss, backward, AdamW) on a random
  batch already on the devices, compiled and run once beforehand: `--steps` steps,
  each waited for. The devices are JAX's defaults (1 on a CPU).
Every row is measured `--rounds` times, the rows in turn, so that load from other
processes on a shared machine hits all of them alike; a row's rate is its examples
over its time, summed over the rounds. The table gives each pipeline's rate as a
ratio to the train step's: above 1 the pipeline keeps up. Both are measured alone;
in training they share the host's cores.

A second table splits one example's pipeline cost into its stages, on one thread (the
fastest of 3 passes over 256 images): reading the file, decoding the JPEG
(`images.load`, with `draft`; also shown without it, for comparison), cropping and
resizing (`images.train_view`), and preparing the batch (`pipeline.PrepareBatch`:
tokenizing and normalising).

    python tools/bench_input.py
    python tools/bench_input.py --num-workers 0,4,8,16 --model S/16 --batches 64

The files stay in the page cache after they are written, so reads cost no disk I/O:
the numbers are the CPU work of the pipeline, an upper bound for data on slow disks.
"""

import argparse
import io
import math
import os
import shlex
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

import bigalign
from bigalign.metrics import markdown_table
from bigalign.data import array_record, images, pipeline, tokenizer as tokenizer_lib
from bigalign.data.csv_source import CsvSource
from bench_configs import sized_config  # tools/ is on sys.path

SIDES = (300, 640)  # range of the images' widths and heights, in pixels
JPEG_QUALITY = 90
CAPTION_WORDS = (8, 20)
NUM_SHARDS = 8
TOKENIZER_VOCAB = 1000
STAGE_SAMPLE = 256  # images timed per stage in the breakdown
STAGE_REPEATS = 3  # passes over them per stage
FULL_DECODE = "(decode JPEG at full size, no draft)"  # for comparison; not a pipeline stage
WORDS = (
    "a an the two three some of on in at with near under over behind beside and "
    "man woman child dog cat bird horse car bus bicycle boat train street road "
    "house building tree grass field beach river mountain sky cloud sun snow "
    "table chair plate food pizza cake cup window door kitchen room park city "
    "red blue green yellow white black brown small large old young happy wooden "
    "sitting standing walking running riding holding looking eating playing "
    "flying parked covered filled view photo picture close up front side top"
).split()


def synthetic_image(rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3]: colour blobs (bicubic-upscaled noise), a linear gradient, grain.

    Smooth enough for JPEG to compress it about as well as a photo, varied enough
    that it is not trivially compressible.
    """
    width, height = (int(side) for side in rng.integers(SIDES[0], SIDES[1] + 1, size=2))
    coarse = rng.integers(0, 256, size=(height // 24, width // 24, 3), dtype=np.uint8)
    blobs = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = rng.uniform(-60, 60) * columns / width + rng.uniform(-60, 60) * rows / height
    grain = rng.normal(0, 4, size=(height, width)).astype(np.float32)
    pixels = np.asarray(blobs, np.float32) + (gradient + grain)[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_dataset(folder: str, count: int) -> tuple[str, str]:
    """Writes the JPEGs, CSV index, ArrayRecord shards and tokenizer into `folder` unless a
    previous run finished doing so. Returns (csv path, shard glob)."""
    index = os.path.join(folder, "index.csv")
    shards = os.path.join(folder, "shards", "pairs")
    done = os.path.join(folder, "complete")
    if os.path.exists(done):
        return index, f"{shards}-*.array_record"
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = ["filepath,caption"]
    for i in range(count):
        name = f"images/{i:06d}.jpg"
        Image.fromarray(synthetic_image(rng)).save(os.path.join(folder, name), quality=JPEG_QUALITY)
        words = rng.choice(WORDS, size=int(rng.integers(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1)))
        lines.append(f"{name},{' '.join(words)}")
    with open(index, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    source = CsvSource(index)
    array_record.write_shards(
        array_record.examples_from_csv(source, array_record.Tally()), shards, NUM_SHARDS
    )
    tokenizer_lib.train_tokenizer(source.captions(), tokenizer_path(folder), TOKENIZER_VOCAB)
    open(done, "w").close()
    print(f"wrote {count} images, the CSV index, {NUM_SHARDS} shards and a tokenizer to {folder} "
          f"in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return index, f"{shards}-*.array_record"


def tokenizer_path(folder: str) -> str:
    return os.path.join(folder, "tokenizer.model")


def data_config(args, spec: str, num_workers: int):
    """The data section for the training stream of `spec` (default augmentation)."""
    data = pipeline.default_config()
    data.name = spec
    data.image_size = args.image_size
    data.num_workers = num_workers
    return data


def pipeline_seconds(args, spec: str, num_workers: int, tokenizer) -> float:
    """Seconds that `train_dataset(spec)` with `num_workers` takes for `--batches` batches
    after the warm-up. The iterator is closed after, so no worker runs on in the background."""
    dataset = pipeline.train_dataset(
        data_config(args, spec, num_workers), tokenizer, max_len=args.max_len,
        global_batch_size=args.batch_size, seed=0,
    )
    iterator = iter(dataset)
    try:
        for _ in range(args.warmup * max(1, num_workers)):
            next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        return time.perf_counter() - start
    finally:
        iterator.close()


def model_config(args):
    """`--model` for the image tower, the same size without the patch for the text tower."""
    return sized_config(
        args.model, batch_size=args.batch_size, image_size=args.image_size,
        max_len=args.max_len, vocab_size=args.vocab_size, embed_dim=args.embed_dim,
    )


class TrainStep:
    """The compiled train step of `--model` with its state and a random batch on the devices."""

    def __init__(self, args):
        run = bigalign.build(model_config(args))  # validates the config
        self.state = run.init_state()
        self.batch = run.global_batch(run.random_batch(np.random.default_rng(0)))
        self.step = run.train_step.lower(self.state, self.batch).compile()
        self.seconds(1)  # the first run also allocates

    def seconds(self, steps: int) -> float:
        """Wall time of `steps` steps, each one finished before the next starts."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


def timed_map(function, items) -> tuple[list, float]:
    """([function(item) ...], milliseconds per item): the fastest of STAGE_REPEATS passes,
    the one least disturbed by other processes."""
    best = math.inf
    for _ in range(STAGE_REPEATS):
        start = time.perf_counter()
        results = [function(item) for item in items]
        best = min(best, time.perf_counter() - start)
    return results, best * 1e3 / len(items)


def stage_costs(args, index: str, tokenizer) -> dict[str, float]:
    """Milliseconds per example of each stage of the training view and batch, on one thread.

    Crop/resize/flip is `images.train_view` of the encoded bytes minus their decoding alone,
    so that it is timed from the decoded PIL image, as in the pipeline.
    """
    source = CsvSource(index)
    examples = [source[i] for i in range(min(STAGE_SAMPLE, len(source)))]
    crop = pipeline.default_config()
    min_side = math.ceil(args.image_size / math.sqrt(crop.crop_scale[0]))  # as train_view
    rng = np.random.default_rng(0)

    def read(example):
        with open(example["image"], "rb") as f:
            return f.read()

    def decode_full(encoded):
        with Image.open(io.BytesIO(encoded)) as image:
            return image.convert("RGB")

    def view(encoded):
        return images.train_view(encoded, args.image_size, rng, scale=crop.crop_scale,
                                 ratio=crop.crop_ratio, flip=crop.flip)

    encoded, read_ms = timed_map(read, examples)
    _, full_ms = timed_map(decode_full, encoded)
    _, decode_ms = timed_map(lambda data: images.load(data, min_side=min_side), encoded)
    views, decode_view_ms = timed_map(view, encoded)
    prepare = pipeline.PrepareBatch(tokenizer, args.max_len, ("image", "text"),
                                    pipeline.default_config())
    batches = [
        {"image": np.stack(views[i : i + args.batch_size]),
         "caption": np.array([e["caption"] for e in examples[i : i + args.batch_size]])}
        for i in range(0, len(examples), args.batch_size)
    ]
    _, prepare_ms = timed_map(prepare.map, batches)
    return {
        "read file": read_ms,
        "decode JPEG (draft)": decode_ms,
        "crop, resize, flip": decode_view_ms - decode_ms,
        "prepare batch": prepare_ms * len(batches) / len(examples),
        FULL_DECODE: full_ms,
    }


def stage_table(costs: dict[str, float]) -> str:
    """The stage costs with their shares of the total; the full-size decode after, apart."""
    stages = {stage: ms for stage, ms in costs.items() if stage != FULL_DECODE}
    total_ms = sum(stages.values())
    rows = [[stage, f"{ms:.2f}", f"{ms / total_ms:.2f}"]
            for stage, ms in [*stages.items(), ("total", total_ms),
                              (FULL_DECODE, costs[FULL_DECODE])]]
    return markdown_table(["stage (one thread)", "ms per example", "vs total"], rows)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="",
                        help="where the dataset is written once and reused (default: a "
                             "temporary folder, deleted at the end)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--num-workers", default="0,1,2",
                        help="comma-separated data.num_workers values (0: a background thread)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--max-len", type=int, default=32, help="text tokens per example")
    parser.add_argument("--model", default="Ti/16",
                        help="image tower variant (Ti/16, S/16, B/16); the text tower gets the "
                             "same size without the patch")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=32000, help="of the model's text tower")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed batches per producer (the thread or each worker)")
    parser.add_argument("--batches", type=int, default=24, help="timed batches per pipeline row")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times every row is measured, the rows in turn, so that load from "
                             "other processes hits all of them alike")
    args = parser.parse_args()
    args.num_workers = [int(n) for n in args.num_workers.split(",")]
    if min(args.num_workers) < 0 or min(args.batches, args.steps, args.warmup, args.rounds) < 1:
        parser.error("--num-workers must be >= 0; --batches, --steps, --warmup, --rounds >= 1")
    return args


def run(args, workdir: str) -> None:
    """Writes (or reuses) the dataset under `workdir`, measures every row, prints the tables."""
    folder = os.path.join(workdir, f"synthetic-{args.num_images}")
    index, shards = make_dataset(folder, args.num_images)
    tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path(folder))
    load_before = os.getloadavg()[0]

    start = time.perf_counter()
    train_step = TrainStep(args)
    print(f"compiled the train step in {time.perf_counter() - start:.0f} s", file=sys.stderr,
          flush=True)
    rows = [(kind, spec, workers)
            for kind, spec in (("csv", f"csv:{index}"), ("array_record", f"array_record:{shards}"))
            for workers in args.num_workers]
    step_seconds = 0.0
    row_seconds = dict.fromkeys(rows, 0.0)
    for round_index in range(args.rounds):
        step_seconds += train_step.seconds(args.steps)
        for row in rows:
            _, spec, workers = row
            row_seconds[row] += pipeline_seconds(args, spec, workers, tokenizer)
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    del train_step
    costs = stage_costs(args, index, tokenizer)

    step_rate = args.rounds * args.steps * args.batch_size / step_seconds
    table = []
    for (kind, _, workers), seconds in row_seconds.items():
        rate = args.rounds * args.batches * args.batch_size / seconds
        table.append([kind, str(workers), f"{rate:.0f}", f"{rate / step_rate:.2f}"])
    table.append([f"train step ({args.model})", "-", f"{step_rate:.1f}", "1.00"])

    devices = jax.devices()
    sizes = [os.path.getsize(os.path.join(folder, "images", name))
             for name in os.listdir(os.path.join(folder, "images"))]
    print(f"\n{os.cpu_count()} CPU cores, {len(devices)} x {devices[0].device_kind} "
          f"({devices[0].platform}), jax {jax.__version__}; load average {load_before:.1f} "
          f"before the run, {os.getloadavg()[0]:.1f} after.\n"
          f"Data: {args.num_images} JPEGs of {SIDES[0]} to {SIDES[1]} px (mean "
          f"{statistics.mean(sizes) / 1e3:.0f} KB) cropped to {args.image_size} px, global batch "
          f"{args.batch_size}, captions to {args.max_len} tokens; per round, {args.batches} "
          f"batches timed after {args.warmup} per producer. Train step: image {args.model}, text "
          f"{args.model.partition('/')[0]}, random batches on the devices; {args.steps} steps "
          f"per round. {args.rounds} rounds, each running every row in turn.\n")
    print(markdown_table(["source", "workers", "examples/s", "vs train step"], table))
    print("\n" + stage_table(costs))


def main():
    args = parse_args()
    print("$ python tools/bench_input.py " + shlex.join(sys.argv[1:]), flush=True)
    if args.workdir:
        run(args, args.workdir)
        return
    with tempfile.TemporaryDirectory(prefix="bench_input-") as workdir:
        run(args, workdir)


if __name__ == "__main__":
    main()
