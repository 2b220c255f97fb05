"""Evaluation of a trained contrastive model: the evaluator registry (`eval.evaluators`)
with zero-shot classification and retrieval (with the modality gap).

All metrics are computed from L2-normalised embeddings of a held-out split:
- zero-shot top-1 (every non-text modality): each class is the normalised mean of
  its prompt embeddings (prompt ensembling, Radford et al. 2021); an image (or
  audio clip) is assigned the class with the highest cosine similarity.
- recall@K: both directions of every contrasted pair (image->text, text->image,
  ...). A retrieved item counts as a hit when its example's caption is identical
  to the query's (datasets repeat captions; COCO-style evaluation counts each of
  an image's captions likewise).
- modality gap: distance between the two embedding centroids of a pair
  (Liang et al., 2022).
"""

import itertools

import numpy as np

from bigalign import sharding
from bigalign.registry import Registry


def embed(embed_batch, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeds `inputs` [N, ...] with `embed_batch` in fixed-size batches: [N, embed_dim]."""
    padded = sharding.pad_rows(inputs, batch_size)  # every batch one shape: one compile
    chunks = [
        np.asarray(embed_batch(padded[i : i + batch_size]))
        for i in range(0, len(padded), batch_size)
    ]
    return np.concatenate(chunks)[: len(inputs)]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def zeroshot_top1(image_embeddings, class_embeddings, labels) -> float:
    """Fraction of images whose most similar class embedding is their label. Shapes [N,E], [C,E], [N]."""
    predictions = np.argmax(image_embeddings @ class_embeddings.T, axis=1)
    return float(np.mean(predictions == labels))


def recall_at_k(similarity, query_groups, candidate_groups, k: int) -> float:
    """Fraction of queries with a same-group candidate among their k most similar.

    similarity: [Q, N]; query_groups: [Q], candidate_groups: [N] (equal ids = a correct pair).
    """
    top_k = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # [Q, k]
    hits = candidate_groups[top_k] == query_groups[:, None]
    return float(np.mean(hits.any(axis=1)))


def modality_gap(image_embeddings, text_embeddings) -> float:
    """Euclidean distance between the two embedding centroids."""
    return float(np.linalg.norm(image_embeddings.mean(0) - text_embeddings.mean(0)))


EVALUATORS = Registry("evaluator")


class Embeddings:
    """embed(modality, inputs [N, ...]) -> [N, E] with the run's compiled embedders, in
    fixed-size batches; each array is embedded once however many evaluators read it."""

    def __init__(self, embedders: dict, batch_size: int):
        self._embedders = embedders  # {modality: fn(inputs [b, ...]) -> [b, E]}
        self._batch_size = batch_size
        self._cache = {}

    def __call__(self, modality: str, values: np.ndarray) -> np.ndarray:
        key = (modality, id(values))
        if key not in self._cache:
            self._cache[key] = (embed(self._embedders[modality], values, self._batch_size), values)
        return self._cache[key][0]  # (the array is kept alive, so its id stays unique)


@EVALUATORS.register("zeroshot")
def zeroshot(embed: Embeddings, eval_data: dict, config) -> dict:
    """`eval/{m}_zeroshot_top1` for every modality m of eval_data["classes"] (needs a text tower)."""
    if "classes" not in eval_data:
        return {}
    classes = eval_data["classes"]
    num_classes, num_prompts, max_len = classes["class_texts"].shape
    prompts = embed("text", classes["class_texts"].reshape(-1, max_len))
    class_embeddings = _normalise(prompts.reshape(num_classes, num_prompts, -1).mean(axis=1))
    return {
        f"eval/{modality}_zeroshot_top1": zeroshot_top1(
            embed(modality, values), class_embeddings, classes["labels"]
        )
        for modality, values in classes["inputs"].items()
    }


@EVALUATORS.register("retrieval")
def retrieval(embed: Embeddings, eval_data: dict, config) -> dict:
    """For every pair (a, b) of towers in eval_data["pairs"], contrasted in training or not
    (binding two modalities to a third aligns them too: ImageBind's emergent retrieval):
    `eval/{a}2{b}_recall@K`, `eval/{b}2{a}_recall@K` and `eval/{a}_{b}_gap`."""
    if "pairs" not in eval_data:
        return {}
    inputs = eval_data["pairs"]["inputs"]
    if "text" in inputs:
        # Examples whose captions have identical tokens form one group: retrieving any
        # of them is correct.
        _, groups = np.unique(inputs["text"], axis=0, return_inverse=True)
        groups = groups.reshape(-1)
    else:
        groups = np.arange(len(next(iter(inputs.values()))))
    results = {}
    for first, second in itertools.combinations(inputs, 2):
        a, b = embed(first, inputs[first]), embed(second, inputs[second])
        similarity = a @ b.T  # [N, N]
        for k in config.eval.recall_at:
            results[f"eval/{first}2{second}_recall@{k}"] = recall_at_k(similarity, groups, groups, k)
            results[f"eval/{second}2{first}_recall@{k}"] = recall_at_k(similarity.T, groups, groups, k)
        results[f"eval/{first}_{second}_gap"] = modality_gap(a, b)
    return results


def evaluate(embedders: dict, eval_data: dict, config) -> dict:
    """The metrics of every evaluator in `config.eval.evaluators`, as {"eval/...": float}.

    `embedders`: {modality: fn(inputs [b, ...]) -> embeddings [b, E]}; `eval_data`: see
    `held_out.eval_data`. An evaluator is fn(embed, eval_data, config) -> metrics,
    registered in EVALUATORS.
    """
    embed = Embeddings(embedders, config.eval.batch_size)
    results = {}
    for name in config.eval.evaluators:
        results.update(EVALUATORS.get(name, "eval.evaluators")(embed, eval_data, config))
    return results
