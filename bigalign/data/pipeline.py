"""Input pipelines: a checkpointable grain training stream and the held-out evaluation arrays.

Training (per JAX process):
    source -> shuffle -> repeat (each epoch reshuffled) -> this process's shard
    -> augment (per example, seeded by its position) -> batch
    -> tokenize / normalise / log-mel (per batch, vectorised) -> prefetch (thread or processes)
Every step is a pure function of (seed, position), so the iterator's state is a
few integers: `grain.checkpoint.CheckpointSave(iterator)` saves it with the train
state, and a restored iterator yields exactly the batches an uninterrupted run would.

Each batch holds exactly the requested modalities (`MODALITIES` names them all):
- "image": float32 [b, H, W, 3], normalised to [-1, 1]: (x / 255 - 0.5) / 0.5.
- "text": int32 [b, max_len], the caption's token ids.
- "audio": float32 [b, frames, mels], the log-mel spectrogram (`audio.log_mel_spectrogram`)
  standardised with fixed constants, (x - AUDIO_LOG_MEL_MEAN) / AUDIO_LOG_MEL_STD, so that
  training and evaluation see the same values whatever the batch.
Sounds are only synthesised when "audio" is requested.
"""

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from bigalign.data import audio, synthetic
from bigalign.data.tokenizer import Tokenizer
from bigalign.errors import UserError

MODALITIES = ("image", "text", "audio")
# data.name -> the modalities its examples provide.
DATASETS = {"shapes": MODALITIES}
# Mean and standard deviation of the shapes sounds' log-mel values at the default audio
# config (-11.70 and 1.94 over 4000 training clips, before augmentation), rounded; fixed
# so that every spectrogram, in training and evaluation, is standardised the same way.
AUDIO_LOG_MEL_MEAN = -11.7
AUDIO_LOG_MEL_STD = 1.9
# Maximum random gain of a training clip, in decibels (uniform in [-G, G]): well below
# the 8 dB loudness gap between small and large shapes.
AUDIO_GAIN_DB = 2.0
# Held-out examples prepared at once by `eval_data` (bounds its working memory).
EVAL_CHUNK = 1024
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
            audio=dict(
                sample_rate=8000,  # Hz of the synthesised waveforms
                clip_seconds=0.5,  # length of a clip: 4000 samples at 8 kHz
                num_mel_bins=32,  # spectrogram channels: HTK mel filters from 0 Hz to Nyquist
                frame_length=256,  # samples per frame (32 ms); the FFT is the next power of two
                hop_length=120,  # samples between frame starts: 32 frames in 0.5 s
            ),
        )
    )


def _check_dataset_name(data_config) -> None:
    if data_config.name not in DATASETS:
        raise UserError(f"unknown data.name {data_config.name!r}; valid: {', '.join(DATASETS)}")


def _check_modalities(data_config, modalities) -> tuple[str, ...]:
    """`modalities` as a tuple, after checking that the configured dataset provides each one."""
    _check_dataset_name(data_config)
    provided = DATASETS[data_config.name]
    unknown = [m for m in modalities if m not in provided]
    if unknown or not modalities:
        problem = f"unknown modalities {unknown}" if unknown else "no modalities"
        raise UserError(
            f"{problem} for data.name={data_config.name!r}; valid: {', '.join(provided)}"
        )
    return tuple(modalities)


def _clip_samples(data_config) -> int:
    """Samples in one sound clip."""
    return round(data_config.audio.clip_seconds * data_config.audio.sample_rate)


def _spectrogram_options(data_config) -> dict:
    """Keyword arguments of `audio.log_mel_spectrogram` for the configured audio."""
    options = {
        key: int(data_config.audio[key])
        for key in ("sample_rate", "num_mel_bins", "frame_length", "hop_length")
    }
    if min(options.values()) <= 0:
        raise UserError(f"data.audio values must be positive; got {options}")
    return options


def input_shapes(data_config, *, max_len: int) -> dict:
    """Per-example shape (no batch dimension) of each modality the dataset provides.

    {"image": (H, W, 3), "text": (max_len,), "audio": (frames, mels)}
    """
    _check_dataset_name(data_config)
    options = _spectrogram_options(data_config)
    frames = audio.num_frames(
        _clip_samples(data_config), options["frame_length"], options["hop_length"]
    )
    if frames == 0:
        raise UserError(
            f"data.audio.clip_seconds={data_config.audio.clip_seconds} is shorter than one "
            f"frame of data.audio.frame_length={options['frame_length']} samples"
        )
    size = data_config.image_size
    shapes = {
        "image": (size, size, 3),
        "text": (max_len,),
        "audio": (frames, options["num_mel_bins"]),
    }
    return {m: shapes[m] for m in DATASETS[data_config.name]}


def _source(data_config, split: str, *, with_audio: bool):
    """The random-access source of one split of the configured dataset."""
    _check_dataset_name(data_config)
    num_examples = data_config.num_train if split == "train" else data_config.num_eval
    return synthetic.ShapesSource(
        split,
        num_examples=num_examples,
        image_size=data_config.image_size,
        seed=data_config.seed,
        with_audio=with_audio,
        sample_rate=data_config.audio.sample_rate,
        clip_samples=_clip_samples(data_config),
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


def jitter_gain(example: dict, rng: np.random.Generator) -> dict:
    """A random gain of at most AUDIO_GAIN_DB on the float32 waveform [S]."""
    gain = np.float32(10 ** (rng.uniform(-AUDIO_GAIN_DB, AUDIO_GAIN_DB) / 20))
    return {**example, "audio": example["audio"] * gain}


def normalise_audio(waveforms: np.ndarray, spectrogram_options: dict) -> np.ndarray:
    """float32 waveforms [b, S] -> standardised log-mel float32 [b, frames, mels]."""
    log_mel = audio.log_mel_spectrogram(waveforms, **spectrogram_options)
    return (log_mel - np.float32(AUDIO_LOG_MEL_MEAN)) * np.float32(1 / AUDIO_LOG_MEL_STD)


class PrepareBatch(grain.transforms.Map):
    """A batch of examples -> the model inputs of `modalities` (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, modalities, spectrogram_options: dict):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.modalities = tuple(modalities)
        self.spectrogram_options = spectrogram_options

    def _prepare(self, modality: str, batch: dict) -> np.ndarray:
        if modality == "image":
            return normalise_images(batch["image"])
        if modality == "text":
            return self.tokenizer.encode([str(c) for c in batch["caption"]], self.max_len)
        return normalise_audio(batch["audio"], self.spectrogram_options)

    def map(self, batch: dict) -> dict:
        return {modality: self._prepare(modality, batch) for modality in self.modalities}


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
    data_config,
    tokenizer: Tokenizer,
    *,
    max_len: int,
    global_batch_size: int,
    seed: int,
    modalities=("image", "text"),
) -> grain.IterDataset:
    """The endless training stream of this process's batches (see the module docstring).

    Yields dicts with exactly the keys `modalities` (any of MODALITIES), each with a
    leading batch dimension b = global_batch_size // jax.process_count().
    """
    modalities = _check_modalities(data_config, modalities)
    batch_size = per_process_batch_size(global_batch_size)
    source = _source(data_config, "train", with_audio="audio" in modalities)
    # shuffle before repeat: the shuffle seed is folded with the epoch, so epochs differ.
    examples = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    # Process p takes examples p, p + P, p + 2P, ... of the shared global order.
    examples = examples[jax.process_index() :: jax.process_count()]
    if data_config.augment:  # each rng is seeded by (seed, position, which transform)
        if "image" in modalities:
            examples = examples.random_map(jitter_photometric)
        if "audio" in modalities:
            examples = examples.random_map(jitter_gain)
    # The stream is rendered on one thread per process: threads would contend for the GIL.
    batches = examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    batches = batches.batch(batch_size, drop_remainder=True)
    batches = batches.map(
        PrepareBatch(tokenizer, max_len, modalities, _spectrogram_options(data_config))
    )
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


def eval_data(data_config, tokenizer: Tokenizer, *, max_len: int, modalities=("image", "text")):
    """The whole held-out split as numpy arrays, plus tokenised class prompts for zero-shot.

    Returns {"inputs": {modality: [N, ...]} (the `modalities`, prepared as in training
    but without augmentation; "text" holds each example's caption), "labels": int32 [N],
    "class_texts": int32 [C, P, max_len] (P prompts per class), "class_names": C strings}.
    """
    modalities = _check_modalities(data_config, modalities)
    source = _source(data_config, "eval", with_audio="audio" in modalities)
    prepare = PrepareBatch(tokenizer, max_len, modalities, _spectrogram_options(data_config))
    chunks, labels = [], []
    for start in range(0, len(source), EVAL_CHUNK):
        examples = [source[i] for i in range(start, min(start + EVAL_CHUNK, len(source)))]
        batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
        chunks.append(prepare.map(batch))
        labels.append(batch["label"])
    prompts = [synthetic.class_prompts(label) for label in range(synthetic.NUM_CLASSES)]
    num_prompts = len(prompts[0])
    class_texts = tokenizer.encode([p for group in prompts for p in group], max_len)
    return {
        "inputs": {m: np.concatenate([chunk[m] for chunk in chunks]) for m in modalities},
        "labels": np.concatenate(labels).astype(np.int32),
        "class_texts": class_texts.reshape(synthetic.NUM_CLASSES, num_prompts, max_len),
        "class_names": list(synthetic.CLASS_NAMES),
    }
