"""The held-out data for evaluation, as arrays: retrieval pairs and zero-shot classes.

- pairs (`data.eval_name`; by default shapes' eval split, or a tfds training set's
  `data.eval_split`): the first `data.num_eval` readable examples, prepared as in
  training without augmentation, each with its first caption;
- classes (`data.zeroshot_name`; by default shapes): labelled examples and, per
  class, the tokenised prompts (shapes: its 40 caption variants; otherwise
  `data.prompts` with the class name).
Unreadable examples are skipped as in training, bounded by data.max_skipped_fraction.
"""

import grain
import numpy as np

from bigalign.data import pipeline, sources, synthetic
from bigalign.data.skipping import SkipCounter
from bigalign.data.tokenizer import Tokenizer
from bigalign.errors import UserError

# Held-out examples prepared at once (bounds the working memory of float32 conversion).
EVAL_CHUNK = 1024
# Threads decoding held-out images (PIL releases the GIL while decoding and resizing).
EVAL_THREADS = 8


def _eval_spec(data_config) -> str:
    """The held-out pairs' source: data.eval_name, else shapes or the tfds training set."""
    if data_config.eval_name:
        return data_config.eval_name
    kind, _ = sources.parse(data_config.name)
    return data_config.name if kind in ("shapes", "tfds") else ""


def _held_out_examples(data_config, source, spec: str) -> list[dict]:
    """The first data.num_eval readable examples of `source`, images centre-cropped."""
    examples = grain.MapDataset.source(source)[: data_config.num_eval]
    if sources.parse(spec)[0] != "shapes":  # shapes are rendered at the model's size
        examples = examples.map(pipeline.EvalView(data_config))
    counter = SkipCounter(data_config.max_skipped_fraction)
    read = examples.to_iter_dataset(grain.ReadOptions(num_threads=EVAL_THREADS))
    kept = [example for example in read if not counter.is_bad(example)]
    if not kept:
        raise UserError(f"the held-out data {spec!r} has no readable examples")
    return kept


def _prepare_held_out(examples: list[dict], prepare: pipeline.PrepareBatch) -> dict:
    """Model inputs {modality: [N, ...]} of `examples`, prepared EVAL_CHUNK at a time."""
    chunks = []
    for start in range(0, len(examples), EVAL_CHUNK):
        chunk = examples[start : start + EVAL_CHUNK]
        keys = [key for key in ("image", "caption", "audio") if key in chunk[0]]
        chunks.append(prepare.map({key: np.stack([e[key] for e in chunk]) for key in keys}))
    return {m: np.concatenate([chunk[m] for chunk in chunks]) for m in prepare.modalities}


def _class_texts(data_config, spec: str, names: list[str]) -> list[list[str]]:
    """The prompts of each class: [C][P] strings."""
    if sources.parse(spec)[0] == "shapes":
        return [synthetic.class_prompts(label) for label in range(len(names))]
    return [[t.format(name) for t in sources.prompts(data_config)] for name in names]


def _zeroshot_data(data_config, tokenizer, max_len, spec, modalities, held_out=None) -> dict:
    """Zero-shot arrays for the non-text `modalities`; reuses `held_out` (examples, inputs)."""
    source = sources.open_zeroshot(data_config, spec, modalities)
    prepare = pipeline.PrepareBatch(tokenizer, max_len, modalities, data_config)
    if held_out is None:
        examples = _held_out_examples(data_config, source, spec)
        inputs = _prepare_held_out(examples, prepare)
    else:
        examples, inputs = held_out
    names = sources.class_names(source)
    labels = np.array([e["label"] for e in examples], np.int32)
    if labels.min() < 0 or labels.max() >= len(names):
        raise UserError(f"{spec!r} has labels up to {labels.max()} but {len(names)} class names; "
                        f"check data.label_key and data.class_names")
    prompts = _class_texts(data_config, spec, names)
    class_texts = tokenizer.encode([p for group in prompts for p in group], max_len)
    return {
        "inputs": {m: inputs[m] for m in modalities},
        "labels": labels,
        "class_texts": class_texts.reshape(len(names), len(prompts[0]), max_len),
        "class_names": names,
    }


def eval_data(data_config, tokenizer: Tokenizer, *, max_len: int, modalities=("image", "text")):
    """The held-out arrays for `evaluate.evaluate`, prepared as in training without augmentation.

    Returns a dict with either or both of
    - "pairs": {"inputs": {modality: [N, ...]}}, the held-out pairs for retrieval
      (data.eval_name; "text" holds each example's first caption);
    - "classes": {"inputs": {modality: [M, ...]}, "labels": int32 [M],
      "class_texts": int32 [C, P, max_len] (P prompts per class), "class_names": C strings},
      for zero-shot classification (data.zeroshot_name; needs a text tower).
    """
    modalities = tuple(modalities)
    result, held_out = {}, None
    pairs_spec = _eval_spec(data_config)
    if pairs_spec:
        key = "data.eval_name" if data_config.eval_name else "data.name"
        pipeline.check_modalities(data_config, pairs_spec, modalities, key)
        source = sources.open_source(data_config, pairs_spec, data_config.eval_split,
                                     with_audio="audio" in modalities)
        prepare = pipeline.PrepareBatch(tokenizer, max_len, modalities, data_config)
        examples = _held_out_examples(data_config, source, pairs_spec)
        held_out = (examples, _prepare_held_out(examples, prepare))
        result["pairs"] = {"inputs": held_out[1]}
    zeroshot_spec = data_config.zeroshot_name or ("shapes" if pairs_spec == "shapes" else "")
    if zeroshot_spec and "text" in modalities:
        provided = sources.modalities(data_config, zeroshot_spec)
        classified = [m for m in modalities if m != "text" and m in provided]
        if classified:
            reuse = held_out if zeroshot_spec == pairs_spec == "shapes" else None
            result["classes"] = _zeroshot_data(
                data_config, tokenizer, max_len, zeroshot_spec, tuple(classified), reuse
            )
    return result
