"""The training input pipeline: a checkpointable grain stream of model-ready batches.

Training (per JAX process):
    source -> shuffle -> repeat (each epoch reshuffled)
    -> per example: decode, augment, pick a caption (seeded by its global position)
    -> this process's block of each global batch (ProcessShare)
    -> drop unreadable examples (counted, bounded: skipping.py) -> batch
    -> tokenize / normalise / log-mel (per batch, vectorised) -> prefetch (thread or processes)
Every step is a pure function of (seed, position), so the iterator's state is a
few integers: `grain.checkpoint.CheckpointSave(iterator)` saves it with the train
state, and a restored iterator yields exactly the batches an uninterrupted run would.

Sources are named by spec strings (sources.py): the built-in "shapes", "tfds:NAME",
"csv:PATH", "array_record:GLOB". Shapes images are rendered at the model's size and
get a light photometric jitter (no crops or flips: captions name positions); other
images get a random-resized crop and a flip in training and a centre crop in
evaluation (images.py).

Each batch holds exactly the requested modalities (`MODALITIES` names them all):
- "image": uint8 [b, H, W, 3] pixels; the image tower scales them to [-1, 1] on the
  device (a quarter of float32's bytes through worker processes and host-to-device).
- "text": int32 [b, max_len], the caption's token ids.
- "audio": float32 [b, frames, mels], the standardised log-mel spectrogram.
(each prepared by its module in `bigalign/modalities/`), plus, in training, "skipped": the number of unreadable examples dropped while this
batch was assembled. Sounds are only synthesised when "audio" is requested.
"""

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from bigalign import modalities as modalities_lib, schema as schema_lib
from bigalign.data import images, sources, synthetic, waveforms
from bigalign.data.skipping import SKIPPED, SkipUnreadable, UnreadableExample
from bigalign.data.tokenizer import Tokenizer
from bigalign.errors import UserError
from bigalign.schema import Integer, Key, Number, Path, Sequence, Text

MODALITIES = sources.ALL_MODALITIES
# Maximum random gain of a training clip, in decibels (uniform in [-G, G]): well below
# the 8 dB loudness gap between small and large shapes.
AUDIO_GAIN_DB = 2.0
# Batches the background thread keeps ready when num_workers == 0.
THREAD_PREFETCH_BATCHES = 2
# At most this many training examples' captions train a tokenizer (evenly spaced).
TOKENIZER_CORPUS_EXAMPLES = 100_000


def schema() -> dict:
    """The `data` section of a bigalign config: defaults for the CPU demo, and each key's
    constraint (schema.py)."""
    return dict(
        # Sources (see sources.py): "shapes", "tfds:NAME", "csv:PATH", "array_record:GLOB".
        name=Key("shapes", Text(nonempty=True)),  # the training pairs
        train_split=Key("train", Text(nonempty=True)),  # tfds split of the training pairs
        eval_name="",  # held-out pairs for retrieval; "": shapes or `name` at eval_split (tfds)
        eval_split=Key("test", Text(nonempty=True)),  # tfds split of the held-out pairs
        zeroshot_name="",  # labelled images for zero-shot ("tfds:cifar10"); "": shapes only
        zeroshot_split=Key("test", Text(nonempty=True)),
        image_size=Key(32, Integer(low=1)),
        num_train=Key(20000, Integer(low=1)),  # shapes only: size of its training split
        # Held-out examples: shapes' eval split; elsewhere the first this many.
        num_eval=Key(1000, Integer(low=1)),
        seed=0,  # what the shapes examples look like; the training seed only orders them
        # >0: that many grain worker processes; 0: one background thread.
        num_workers=Key(0, Integer(low=0)),
        augment=True,
        crop_scale=(0.9, 1.0),  # random-resized crop: range of the area fraction kept
        crop_ratio=(3 / 4, 4 / 3),  # ... and of its aspect ratio
        flip=True,  # random horizontal flips (not on shapes: captions name left and right)
        # Unreadable examples tolerated before the run stops.
        max_skipped_fraction=Key(0.01, Number(low=0, high=1)),
        # tfds features (nested: "captions/text"); a ClassLabel text_key gives prompt captions.
        image_key="image",
        text_key=Key("caption", Text(nonempty=True)),
        label_key="label",
        # "": tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
        tfds_data_dir=Key("", Path("directory")),
        csv_image_column="filepath",
        csv_text_column=Key("caption", Text(nonempty=True)),
        csv_audio_column="",  # a column of WAV paths, for audio towers ("": none)
        csv_separator="",  # "": tab for .tsv, comma otherwise
        # Each row's class (a name of data.class_names, or an id) in a CSV used for
        # zero-shot (data.zeroshot_name=csv:...). Read only there, so pairs CSVs need no
        # such column, and a labelled CSV with a "label" column needs just data.class_names.
        csv_label_column=Key("label", Text(nonempty=True)),
        # A file with one zero-shot class name per line, the i-th naming class id i
        # (overrides tfds'; a CSV needs it).
        class_names=Key("", Path("file")),
        # Zero-shot prompt templates with one "{}"; (): sources.DEFAULT_PROMPTS.
        prompts=Key((), Sequence(Text(nonempty=True))),
        audio=dict(
            sample_rate=Key(8000, Integer(low=1)),  # Hz of the synthesised waveforms
            clip_seconds=Key(0.5, Number(above=0)),  # length of a clip: 4000 samples at 8 kHz
            # Spectrogram channels: HTK mel filters from 0 Hz to Nyquist.
            num_mel_bins=Key(32, Integer(low=1)),
            # Samples per frame (32 ms); the FFT is the next power of two.
            frame_length=Key(256, Integer(low=1)),
            hop_length=Key(120, Integer(low=1)),  # samples between frame starts: 32 frames in 0.5 s
        ),
    )


def default_config() -> ml_collections.ConfigDict:
    """The `data` section's defaults (see `schema`)."""
    return schema_lib.defaults(schema())


def validate(data_config) -> None:
    """Checks the values of the data section (config.validate checks its keys)."""
    for key in ("name", "eval_name", "zeroshot_name"):
        if data_config[key] or key == "name":
            sources.parse(data_config[key])
    low, high = data_config.crop_scale
    if not 0 < low <= high <= 1:
        raise UserError(f"data.crop_scale={tuple(data_config.crop_scale)} must be (low, high) "
                        f"with 0 < low <= high <= 1: fractions of the image area")
    low, high = data_config.crop_ratio
    if not 0 < low <= high:
        raise UserError(f"data.crop_ratio={tuple(data_config.crop_ratio)} must be (low, high) "
                        f"aspect ratios with 0 < low <= high")
    sources.prompts(data_config)


def check_modalities(data_config, spec: str, modalities, key="data.name") -> tuple[str, ...]:
    """`modalities` as a tuple, after checking that the source `spec` provides each one."""
    provided = sources.modalities(data_config, spec)
    unknown = [m for m in modalities if m not in provided]
    if unknown or not modalities:
        problem = f"unknown modalities {unknown}" if unknown else "no modalities"
        raise UserError(f"{problem} for {key}={spec!r}; valid: {', '.join(provided)}")
    return tuple(modalities)


def input_shapes(data_config, *, max_len: int) -> dict:
    """Per-example shape (no batch dimension) of each modality the training source provides.

    {"image": (H, W, 3), "text": (max_len,), "audio": (frames, mels)}
    """
    provided = sources.modalities(data_config, data_config.name)
    return {m: modalities_lib.get(m).input_shape(data_config, max_len) for m in provided}


def captions_of(example: dict) -> list[str]:
    """A raw example's captions as a list (its "caption" may be one string)."""
    captions = example["caption"]
    return [captions] if isinstance(captions, str) else list(captions)


def _unreadable(example: dict, reason: str) -> dict:
    return {"origin": example["origin"], "error": reason}


class _View:
    """Decodes a raw example's files into fixed-size model inputs (see TrainView, EvalView)."""

    def __init__(self, data_config):
        self.size = data_config.image_size
        self.sample_rate = data_config.audio.sample_rate
        self.clip_samples = sources.clip_samples(data_config)
        self.augment = data_config.augment
        self.crop = dict(scale=tuple(data_config.crop_scale), ratio=tuple(data_config.crop_ratio),
                         flip=data_config.flip)

    def view(self, example: dict, rng: np.random.Generator | None) -> dict:
        """{"image", "audio", "caption", "label", "origin"}, those the example has; with
        `rng` a training view (random crop, flip, window, caption), else the eval view."""
        if "error" in example:
            return example
        view = {key: example[key] for key in ("origin", "label", "captions") if key in example}
        if "caption" in example:
            captions = captions_of(example)
            if not captions:
                return _unreadable(example, "no caption")
            pick = int(rng.integers(len(captions))) if rng is not None else 0
            view["caption"] = captions[pick]
        try:
            if "image" in example:
                view["image"] = (
                    images.train_view(example["image"], self.size, rng, **self.crop)
                    if rng is not None and self.augment
                    else images.eval_view(example["image"], self.size)
                )
            if "audio" in example:
                waveform = waveforms.load(example["audio"], self.sample_rate)
                window_rng = rng if self.augment else None  # None: the first window
                view["audio"] = waveforms.clip(waveform, self.clip_samples, window_rng)
        except UnreadableExample as error:
            return _unreadable(example, str(error))
        return view


class TrainView(_View, grain.transforms.RandomMap):
    """Raw example -> training inputs: with data.augment a random-resized crop and flip
    (else the centre crop), a random window of the sound, one of its captions at random.
    Unreadable files become {"origin", "error"} for SkipUnreadable to drop."""

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        return self.view(example, rng)


class EvalView(_View, grain.transforms.Map):
    """Raw example -> eval inputs: the centre crop, the first window, the first caption."""

    def map(self, example: dict) -> dict:
        return self.view(example, None)


def tokenizer_corpus(data_config) -> list[str]:
    """Texts to train a tokenizer on: the training captions (for shapes: every possible
    caption; for large sources an even sample) and the zero-shot class prompts."""
    if sources.parse(data_config.name)[0] == "shapes":
        return synthetic.caption_corpus()
    source = sources.open_source(data_config, data_config.name, data_config.train_split)
    if hasattr(source, "captions"):  # CSV and ArrayRecord read captions without images
        texts = source.captions()
    else:
        stride = max(1, len(source) // TOKENIZER_CORPUS_EXAMPLES)
        texts = [text for i in range(0, len(source), stride) for text in captions_of(source[i])]
    if data_config.zeroshot_name:
        names = sources.class_names(sources.open_zeroshot(data_config, data_config.zeroshot_name))
        texts += [t.format(n) for n in names for t in sources.prompts(data_config)]
    return texts


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


class PrepareBatch(grain.transforms.Map):
    """A batch of examples -> the model inputs of `modalities` (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, modalities, data_config):
        self.context = modalities_lib.PrepareContext(tokenizer, max_len, data_config)
        self.modalities = tuple(modalities)

    def map(self, batch: dict) -> dict:
        prepared = {}
        for name in self.modalities:
            modality = modalities_lib.get(name)
            prepared[name] = modality.prepare(batch[modality.raw_key], self.context)
        if SKIPPED in batch:
            prepared[SKIPPED] = int(np.sum(batch[SKIPPED]))
        return prepared


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """The batch each of `process_count` JAX processes loads."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(
            f"batch_size={global_batch_size} must be a positive multiple of the "
            f"{process_count} JAX processes"
        )
    return global_batch_size // process_count


class ProcessShare(grain.MapDataset):
    """Process `index` of `count`'s examples of each global batch, from `start_batch` on.

    Global batch k holds positions k*B ... k*B + B-1 of the shared order; each process
    takes its contiguous block of b = B / count of them, so the batch assembled over the
    mesh (process 0's devices first) is the one-process batch, rows in the same order,
    however many processes load it.
    """

    def __init__(self, parent: grain.MapDataset, *, index: int, count: int,
                 global_batch_size: int, start_batch: int = 0):
        super().__init__(parent)
        self._global_batch_size = global_batch_size
        self._share = per_process_batch_size(global_batch_size, count)
        self._offset = start_batch * global_batch_size + index * self._share

    def __len__(self) -> int:
        return len(self._parent)  # a repeated source: endless

    def global_position(self, local: int) -> int:
        """The position in the shared order of this process's `local`-th example."""
        batch, row = divmod(local, self._share)
        return self._offset + batch * self._global_batch_size + row

    def __getitem__(self, local: int):
        return self._parent[self.global_position(local)]

    def __str__(self) -> str:
        return f"ProcessShare(b={self._share}, offset={self._offset})"


def train_dataset(
    data_config,
    tokenizer: Tokenizer,
    *,
    max_len: int,
    global_batch_size: int,
    seed: int,
    modalities=("image", "text"),
    process: tuple[int, int] | None = None,
    start_batch: int = 0,
) -> grain.IterDataset:
    """The endless training stream of this process's batches (see the module docstring).

    Yields dicts with the keys `modalities` (any of MODALITIES), each with a leading
    batch dimension b = global_batch_size // process count, and "skipped". `process`:
    (index, count) of the loading process; None: this JAX process of jax.process_count().
    `start_batch`: the global batch the stream starts at (resuming where a checkpoint's
    data position was saved by another number of processes).
    """
    index, count = process or (jax.process_index(), jax.process_count())
    modalities = check_modalities(data_config, data_config.name, modalities)
    batch_size = per_process_batch_size(global_batch_size, count)
    source = sources.open_source(data_config, data_config.name, data_config.train_split,
                                 with_audio="audio" in modalities)
    # shuffle before repeat: the shuffle seed is folded with the epoch, so epochs differ.
    examples = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    # Each rng is seeded by (seed, global position, which transform): an example is
    # augmented the same way however many processes load the stream.
    if sources.parse(data_config.name)[0] != "shapes":
        examples = examples.random_map(TrainView(data_config))
    elif data_config.augment:
        if "image" in modalities:
            examples = examples.random_map(jitter_photometric)
        if "audio" in modalities:
            examples = examples.random_map(jitter_gain)
    # Lazily: each process reads and augments only its own share.
    examples = ProcessShare(examples, index=index, count=count,
                            global_batch_size=global_batch_size, start_batch=start_batch)
    # The stream is rendered on one thread per process: threads would contend for the GIL.
    batches = examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    batches = SkipUnreadable(batches, data_config.max_skipped_fraction)
    batches = batches.batch(batch_size, drop_remainder=True)
    batches = batches.map(
        PrepareBatch(tokenizer, max_len, modalities, data_config)
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
