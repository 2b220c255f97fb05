"""Held-out sets for the evaluators, streamed: read, prepared and embedded a batch at a time.

Only the embeddings (and labels, caption tokens) are kept, never the decoded inputs,
so a held-out set of any size costs N x embed_dim floats per modality on the host.

- pairs (retrieval, geometry): the first `data.num_eval` readable examples of a
  source, each with its first caption or with all of them (COCO-style retrieval);
- classes (zero-shot, linear probes): labelled examples of a source with class
  labels, and the class names (shapes: colour x shape; tfds: its ClassLabel; CSV:
  `data.class_names`).
Examples are prepared as in training without augmentation (centre crop, first sound
window). Unreadable examples are skipped as in training, bounded by
data.max_skipped_fraction.
"""

import dataclasses

import grain
import numpy as np

from bigalign.data import pipeline, sources, synthetic
from bigalign.data.skipping import SkipCounter
from bigalign.errors import UserError

# Threads decoding held-out images (PIL releases the GIL while decoding and resizing).
EVAL_THREADS = 8


def pairs_spec(data_config) -> str:
    """The default held-out pairs: data.eval_name, else shapes or the tfds training set
    (at data.eval_split); "" when there are none."""
    if data_config.eval_name:
        return data_config.eval_name
    kind, _ = sources.parse(data_config.name)
    return data_config.name if kind in ("shapes", "tfds") else ""


def classes_spec(data_config) -> str:
    """The default labelled set: data.zeroshot_name, else shapes when training on shapes."""
    if data_config.zeroshot_name:
        return data_config.zeroshot_name
    return "shapes" if sources.parse(data_config.name)[0] == "shapes" else ""


@dataclasses.dataclass
class EmbeddedSet:
    """A held-out set as the evaluators see it (N examples, T captions)."""

    spec: str
    count: int  # N
    embeddings: dict  # {modality: float32 [N, E]}; "text": [T, E], one row per caption
    caption_owner: np.ndarray | None = None  # int [T]: the example each caption belongs to
    caption_tokens: np.ndarray | None = None  # int [T, max_len]
    labels: np.ndarray | None = None  # int [N], for a labelled set
    class_names: list | None = None


class _AllCaptions(grain.transforms.Map):
    """A raw example's captions as a list, under "captions" (its "caption" may be one)."""

    def map(self, example: dict) -> dict:
        if "caption" not in example or "error" in example:
            return example
        return {**example, "captions": pipeline.captions_of(example)}


def _examples(data_config, source, spec: str, *, limit: int, all_captions: bool):
    """The first `limit` readable examples of `source`, prepared for evaluation, in order."""
    dataset = grain.MapDataset.source(source)[:limit]
    if all_captions:
        dataset = dataset.map(_AllCaptions())
    if sources.parse(spec)[0] != "shapes":  # shapes are rendered at the model's size
        dataset = dataset.map(pipeline.EvalView(data_config))
    counter = SkipCounter(data_config.max_skipped_fraction)
    kept = 0
    for example in dataset.to_iter_dataset(grain.ReadOptions(num_threads=EVAL_THREADS)):
        if not counter.is_bad(example):
            kept += 1
            yield example
    if not kept:
        raise UserError(f"the held-out data {spec!r} has no readable examples")


class _Embedder:
    """Prepares and embeds batches of examples, keeping only the results."""

    def __init__(self, run, embed, modalities, all_captions: bool):
        data_config, tokenizer, max_len = run.config.data, run.tokenizer, run.config.text.max_len
        self.prepare = pipeline.PrepareBatch(tokenizer, max_len, modalities, data_config)
        self.embed, self.all_captions = embed, all_captions
        self.parts = {m: [] for m in modalities}
        self.owners, self.tokens, self.labels, self.count = [], [], [], 0

    def add(self, batch: list[dict]) -> None:
        raw = {}
        for key in ("image", "audio"):
            if key in batch[0]:
                raw[key] = np.stack([example[key] for example in batch])
        if "text" in self.parts:
            captions = [e["captions"] if self.all_captions else [e["caption"]] for e in batch]
            raw["caption"] = np.array([c for group in captions for c in group])
            self.owners += [self.count + i for i, group in enumerate(captions) for _ in group]
        inputs = self.prepare.map(raw)
        for modality, values in inputs.items():
            self.parts[modality].append(self.embed(modality, values))
        if "text" in inputs:
            self.tokens.append(inputs["text"])
        if "label" in batch[0]:
            self.labels += [int(example["label"]) for example in batch]
        self.count += len(batch)

    def result(self, spec: str, class_names=None) -> EmbeddedSet:
        text = "text" in self.parts
        return EmbeddedSet(
            spec=spec,
            count=self.count,
            embeddings={m: np.concatenate(parts) for m, parts in self.parts.items()},
            caption_owner=np.array(self.owners, np.int64) if text else None,
            caption_tokens=np.concatenate(self.tokens) if text else None,
            labels=np.array(self.labels, np.int64) if class_names is not None else None,
            class_names=class_names,
        )


def embed_set(run, embed, spec: str, split: str, *, modalities, role: str = "pairs",
              all_captions: bool = False, limit: int | None = None) -> EmbeddedSet:
    """The first `limit` (default data.num_eval) readable examples of `spec` at `split`,
    embedded a batch of eval.batch_size at a time with embed(modality, inputs) -> [b, E].

    role "classes" reads a labelled source: labels and class names come with it.
    """
    data_config = run.config.data
    pipeline.check_modalities(data_config, spec, modalities, key=f"the held-out set {role}")
    source = sources.open_source(data_config, spec, split, role=role,
                                 with_audio="audio" in modalities)
    class_names = sources.class_names(source) if role == "classes" else None
    embedder = _Embedder(run, embed, modalities, all_captions)
    batch, size = [], run.config.eval.batch_size
    for example in _examples(data_config, source, spec, limit=limit or data_config.num_eval,
                             all_captions=all_captions):
        batch.append(example)
        if len(batch) == size:
            embedder.add(batch)
            batch = []
    if batch:
        embedder.add(batch)
    result = embedder.result(spec, class_names)
    if class_names is not None and (result.labels.min() < 0 or result.labels.max() >= len(class_names)):
        raise UserError(f"{spec!r} has labels up to {result.labels.max()} but {len(class_names)} "
                        f"class names; check data.label_key and data.class_names")
    return result


def class_texts(data_config, spec: str, names: list[str]) -> list[list[str]]:
    """The prompts of each class, [C][P] strings: shapes' own caption variants, else
    data.prompts filled with the class name."""
    if sources.parse(spec)[0] == "shapes":
        return [synthetic.class_prompts(label) for label in range(len(names))]
    return [[t.format(name) for t in sources.prompts(data_config)] for name in names]
