"""Where examples come from: one spec string per dataset, opened as a random-access source.

Specs (`data.name`, `data.eval_name`, `data.zeroshot_name`) are "kind" or "kind:argument",
the kind looked up in the SOURCES registry. Built in:
- "shapes": the built-in synthetic data (`synthetic.py`), with its own train/eval splits;
- "tfds:NAME": a prepared tfds dataset (`tfds_source.py`), e.g. "tfds:cifar10",
  "tfds:coco_captions/2017";
- "csv:PATH": a CSV/TSV index of image (or WAV) files and captions, or, for zero-shot,
  class labels (`csv_source.py`);
- "array_record:GLOB": shards written by tools/make_array_record.py (`array_record.py`).

Every source maps an index to a raw example, a dict with some of:
    "image":   uint8 [H, W, 3], encoded bytes, or a file path (decoded by images.py)
    "caption": a str, or a list of str (several captions: one is drawn per visit)
    "label":   int class id (zero-shot sources)
    "audio":   float32 waveform [S] (shapes), or a WAV file path (decoded by waveforms.py)
    "origin":  where the example came from, for error messages
or, when the example cannot be read, just {"origin": ..., "error": reason}.

A new kind is an opening function plus a registration, in any module imported before
the run is built; then "mine:PATH" is a valid spec:

    def open_mine(data_config, argument, split, role, with_audio):
        return MySource(argument)  # len() and [index] -> raw example

    sources.SOURCES.register("mine", sources.SourceKind(open_mine, argument_name="PATH"))
"""

import dataclasses
from collections.abc import Callable

from bigalign.data import array_record, csv_source, synthetic, tfds_source
from bigalign.errors import UserError
from bigalign.registry import Registry

ALL_MODALITIES = ("image", "text", "audio")
# Templates for zero-shot class prompts (and captions from class labels), after CLIP.
DEFAULT_PROMPTS = (
    "a photo of a {}.",
    "a good photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
)


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """How to open one kind of spec.

    open(data_config, argument, split, role, with_audio) -> source (see open_source);
    modalities(data_config, argument) -> the modalities its examples provide;
    argument_name: what follows "kind:" ("PATH", shown in error messages), "" for no argument;
    labels: whether it can serve zero-shot (role "classes"), i.e. has class labels.
    """

    open: Callable
    modalities: Callable = lambda data_config, argument: ("image", "text")
    argument_name: str = ""
    labels: bool = False

    def form(self, kind: str) -> str:
        """The spec form for messages: "shapes", "tfds:NAME"."""
        return f"{kind}:{self.argument_name}" if self.argument_name else kind


SOURCES = Registry("data source")


def _one_of(kinds) -> str:
    """"'shapes', 'tfds:NAME' or 'csv:PATH'": the spec forms of the registered `kinds`."""
    forms = [repr(SOURCES.get(kind).form(kind)) for kind in kinds]
    return f"{', '.join(forms[:-1])} or {forms[-1]}" if len(forms) > 1 else forms[0]


def clip_samples(data_config) -> int:
    """Samples in one sound clip of data.audio.clip_seconds at data.audio.sample_rate."""
    return round(data_config.audio.clip_seconds * data_config.audio.sample_rate)


def parse(spec: str) -> tuple[str, str]:
    """"kind:argument" -> (kind, argument); "shapes" -> ("shapes", "")."""
    kind, _, argument = spec.partition(":")
    if kind not in SOURCES or bool(SOURCES.get(kind).argument_name) != bool(argument):
        raise UserError(f"unknown data source {spec!r}; use {_one_of(SOURCES.names())}")
    return kind, argument


def modalities(data_config, spec: str) -> tuple[str, ...]:
    """The modalities that examples of `spec` provide (a CSV index: those it has columns for)."""
    kind, argument = parse(spec)
    return tuple(SOURCES.get(kind).modalities(data_config, argument))


def prompts(data_config) -> tuple[str, ...]:
    """The zero-shot prompt templates ("a photo of a {}.")."""
    templates = tuple(data_config.prompts) or DEFAULT_PROMPTS
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise UserError(f"data.prompts entry {bad[0]!r} must contain '{{}}' exactly once")
    return templates


def class_names_override(data_config) -> list[str]:
    """The class names from the data.class_names file (one per line), or [] when unset."""
    if not data_config.class_names:
        return []
    try:
        with open(data_config.class_names, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as error:
        raise UserError(f"cannot read data.class_names={data_config.class_names!r}: "
                        f"{error.strerror}; give a text file with one class name per line") from None


def open_source(data_config, spec: str, split: str, *, role: str = "pairs",
                with_audio: bool = False):
    """The source of `spec` at `split` ("train", or a held-out split name).

    role: "pairs" (image + caption) or "classes" (image + label, for zero-shot).
    Shapes ignores the split name beyond train vs held out; CSV and ArrayRecord ignore it.
    """
    kind, argument = parse(spec)
    entry = SOURCES.get(kind)
    if role == "classes" and not entry.labels:
        labelled = [name for name in SOURCES.names() if SOURCES.get(name).labels]
        raise UserError(f"data.zeroshot_name={spec!r}: zero-shot needs class labels; use "
                        f"{_one_of(labelled)}")
    return entry.open(data_config, argument, split, role, with_audio)


def open_zeroshot(data_config, spec: str, modalities=("image",)):
    """The labelled source `spec` at data.zeroshot_split, for zero-shot classification."""
    return open_source(data_config, spec, data_config.zeroshot_split, role="classes",
                       with_audio="audio" in modalities)


def class_names(source) -> list[str]:
    """The zero-shot class names of a labelled source (shapes: colour x shape)."""
    names = getattr(source, "class_names", synthetic.CLASS_NAMES)
    if not names:
        raise UserError(f"{source!r} has no class names for zero-shot; point data.label_key at a "
                        f"ClassLabel feature or list them in a data.class_names file")
    return list(names)


# The built-in kinds.
def _open_shapes(data_config, argument, split, role, with_audio):
    train = split == "train"
    return synthetic.ShapesSource(
        "train" if train else "eval",
        num_examples=data_config.num_train if train else data_config.num_eval,
        image_size=data_config.image_size,
        seed=data_config.seed,
        with_audio=with_audio,
        sample_rate=data_config.audio.sample_rate,
        clip_samples=clip_samples(data_config),
    )


def _open_tfds(data_config, argument, split, role, with_audio):
    return tfds_source.TfdsSource(
        argument, split, data_dir=data_config.tfds_data_dir,
        image_key=data_config.image_key,
        text_key=data_config.text_key if role == "pairs" else "",
        label_key=data_config.label_key if role == "classes" else "",
        prompts=prompts(data_config), class_names=class_names_override(data_config),
    )


def _open_csv(data_config, argument, split, role, with_audio):
    classes = role == "classes"  # labels instead of captions
    return csv_source.CsvSource(
        argument, image_column=data_config.csv_image_column,
        text_column="" if classes else data_config.csv_text_column,
        audio_column=data_config.csv_audio_column,
        label_column=data_config.csv_label_column if classes else "",
        class_names=class_names_override(data_config), separator=data_config.csv_separator,
    )


def _open_array_record(data_config, argument, split, role, with_audio):
    return array_record.ArrayRecordSource(argument)


def _csv_modalities(data_config, argument):
    columns = {"image": data_config.csv_image_column, "text": data_config.csv_text_column,
               "audio": data_config.csv_audio_column}
    return tuple(m for m in ALL_MODALITIES if columns[m])


SOURCES.register("shapes", SourceKind(_open_shapes, lambda data_config, argument: ALL_MODALITIES,
                                      labels=True))
SOURCES.register("tfds", SourceKind(_open_tfds, argument_name="NAME", labels=True))
SOURCES.register("csv", SourceKind(_open_csv, _csv_modalities, argument_name="PATH",
                                   labels=True))
SOURCES.register("array_record", SourceKind(_open_array_record, argument_name="GLOB"))
