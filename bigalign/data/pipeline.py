"""Input pipelines: a checkpointable grain training stream and the held-out evaluation arrays.

Training (per JAX process):
    source -> shuffle -> repeat (each epoch reshuffled) -> this process's shard
    -> augment (per example, seeded by its position) -> batch
    -> tokenize + normalise (per batch, vectorised) -> prefetch (thread or worker processes)
Every step is a pure function of (seed, position), so the iterator's state is a
few integers: `grain.checkpoint.CheckpointSave(iterator)` saves it with the train
state, and a restored iterator yields exactly the batches an uninterrupted run would.

Images are normalised to [-1, 1]: (x / 255 - 0.5) / 0.5.
"""

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from bigalign.data import synthetic
from bigalign.data.tokenizer import Tokenizer
from bigalign.errors import UserError

DATASETS = ("shapes",)
# Batches the background thread keeps ready when num_workers == 0.
THREAD_PREFETCH_BATCHES = 2


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a bigalign config, with defaults for the CPU demo."""
    return ml_collections.ConfigDict(
        dict(
            name="shapes",
            image_size=32,
            num_train=20000,
            num_eval=1000,
            seed=0,  # what the examples look like; the training seed only orders them
            num_workers=0,  # >0: that many grain worker processes; 0: one background thread
            augment=True,
        )
    )


def _check_dataset_name(data_config) -> None:
    if data_config.name not in DATASETS:
        raise UserError(f"unknown data.name {data_config.name!r}; valid: {', '.join(DATASETS)}")


def _source(data_config, split: str):
    """The random-access source of one split of the configured dataset."""
    _check_dataset_name(data_config)
    num_examples = data_config.num_train if split == "train" else data_config.num_eval
    return synthetic.ShapesSource(
        split, num_examples=num_examples, image_size=data_config.image_size, seed=data_config.seed
    )


def tokenizer_corpus(data_config) -> list[str]:
    """Texts to train this dataset's tokenizer on (for shapes: every possible caption)."""
    _check_dataset_name(data_config)
    return synthetic.caption_corpus()


def normalise_images(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
    return images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def jitter_photometric(example: dict, rng: np.random.Generator) -> dict:
    """Light brightness/contrast change and pixel noise on uint8 [H, W, 3].

    No flips or crops: captions name the left/right/top/bottom position.
    """
    image = example["image"].astype(np.float32)  # [H, W, 3]
    contrast = float(rng.uniform(0.85, 1.15))
    brightness = float(rng.uniform(-15.0, 15.0))
    noise_std = float(rng.uniform(0.0, 4.0))
    mean = float(image.mean())
    image = (image - mean) * contrast + mean + brightness
    image = image + noise_std * rng.standard_normal(image.shape[:2] + (1,), dtype=np.float32)
    return {**example, "image": np.clip(image + 0.5, 0, 255).astype(np.uint8)}


class TokenizeAndNormalise(grain.transforms.Map):
    """Batch of examples -> {"image": float32 [b, H, W, 3], "text": int32 [b, max_len]}."""

    def __init__(self, tokenizer: Tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def map(self, batch: dict) -> dict:
        return {
            "image": normalise_images(batch["image"]),
            "text": self.tokenizer.encode([str(c) for c in batch["caption"]], self.max_len),
        }


def per_process_batch_size(global_batch_size: int) -> int:
    """The batch each JAX process loads: global_batch_size / process_count."""
    processes = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % processes:
        raise UserError(
            f"batch_size={global_batch_size} must be a positive multiple of the "
            f"{processes} JAX processes"
        )
    return global_batch_size // processes


def train_dataset(
    data_config, tokenizer: Tokenizer, *, max_len: int, global_batch_size: int, seed: int
) -> grain.IterDataset:
    """The endless training stream of this process's batches (see the module docstring).

    Yields {"image": float32 [b, H, W, 3], "text": int32 [b, max_len]} with
    b = global_batch_size // jax.process_count().
    """
    batch_size = per_process_batch_size(global_batch_size)
    source = _source(data_config, "train")
    # shuffle before repeat: the shuffle seed is folded with the epoch, so epochs differ.
    examples = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    # Process p takes examples p, p + P, p + 2P, ... of the shared global order.
    examples = examples[jax.process_index() :: jax.process_count()]
    if data_config.augment:
        examples = examples.random_map(jitter_photometric)  # rng seeded by (seed, position)
    # The stream is rendered on one thread per process: threads would contend for the GIL.
    batches = examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    batches = batches.batch(batch_size, drop_remainder=True)
    batches = batches.map(TokenizeAndNormalise(tokenizer, max_len))
    if data_config.num_workers > 0:
        _mark_absl_flags_parsed()
        return batches.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        )
    # Overlaps data work with the (GIL-releasing) training step.
    return grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=THREAD_PREFETCH_BATCHES
    )


def _mark_absl_flags_parsed() -> None:
    """grain's mp_prefetch reads absl flags; outside `app.run` (tests, notebooks) use defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_data(data_config, tokenizer: Tokenizer, *, max_len: int) -> dict:
    """The whole held-out split as numpy arrays, plus tokenised class prompts for zero-shot.

    Returns:
      images: float32 [N, H, W, 3] (normalised like training), texts: int32 [N, max_len]
      (each image's caption), labels: int32 [N], class_texts: int32 [C, P, max_len]
      (P prompts per class), class_names: list of C strings.
    """
    source = _source(data_config, "eval")
    examples = [source[i] for i in range(len(source))]
    prompts = [synthetic.class_prompts(label) for label in range(synthetic.NUM_CLASSES)]
    num_prompts = len(prompts[0])
    class_texts = tokenizer.encode([p for group in prompts for p in group], max_len)
    return {
        "images": normalise_images(np.stack([e["image"] for e in examples])),
        "texts": tokenizer.encode([e["caption"] for e in examples], max_len),
        "labels": np.array([e["label"] for e in examples], np.int32),
        "class_texts": class_texts.reshape(synthetic.NUM_CLASSES, num_prompts, max_len),
        "class_names": list(synthetic.CLASS_NAMES),
    }
