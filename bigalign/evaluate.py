"""Evaluation of a trained contrastive model: zero-shot classification, retrieval, modality gap.

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

import jax
import numpy as np


def embed(embed_batch, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeds `inputs` [N, ...] with `embed_batch` in fixed-size batches: [N, embed_dim]."""
    count = len(inputs)
    padding = (-count) % batch_size  # pad so every batch has one shape (one compile)
    padded = np.concatenate([inputs, np.repeat(inputs[-1:], padding, axis=0)])
    chunks = [
        np.asarray(embed_batch(padded[i : i + batch_size]))
        for i in range(0, len(padded), batch_size)
    ]
    return np.concatenate(chunks)[:count]


def _tower(model, params, modality: str):
    """A function batch -> embeddings for one modality, compiled once, params passed as arguments."""
    apply = jax.jit(lambda p, x: model.apply({"params": p}, {modality: x})["embeddings"][modality])
    return lambda batch: apply(params, batch)


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


def evaluate(model, params, eval_data: dict, *, pairs, batch_size: int, recall_at=(1, 5)) -> dict:
    """All metrics on `eval_data` (see `held_out.eval_data`), as {"eval/...": float}.

    eval_data["classes"] (zero-shot; needs a text tower): `eval/{m}_zeroshot_top1` for every
    modality m it holds. eval_data["pairs"] (retrieval): for every pair (a, b) of `pairs`,
    `eval/{a}2{b}_recall@K`, `eval/{b}2{a}_recall@K` and `eval/{a}_{b}_gap`.
    """
    towers, embedded = {}, {}

    def embeddings(modality: str, values: np.ndarray) -> np.ndarray:
        # The same array may serve retrieval and zero-shot: embed it once.
        key = (modality, id(values))
        if key not in embedded:
            if modality not in towers:
                towers[modality] = _tower(model, params, modality)
            embedded[key] = embed(towers[modality], values, batch_size)
        return embedded[key]

    results = {}
    if "classes" in eval_data:
        classes = eval_data["classes"]
        num_classes, num_prompts, max_len = classes["class_texts"].shape
        prompts = embeddings("text", classes["class_texts"].reshape(-1, max_len))
        class_embeddings = _normalise(prompts.reshape(num_classes, num_prompts, -1).mean(axis=1))
        for modality, values in classes["inputs"].items():
            results[f"eval/{modality}_zeroshot_top1"] = zeroshot_top1(
                embeddings(modality, values), class_embeddings, classes["labels"]
            )
    if "pairs" in eval_data:
        inputs = eval_data["pairs"]["inputs"]
        if "text" in inputs:
            # Examples whose captions have identical tokens form one group: retrieving any
            # of them is correct.
            _, groups = np.unique(inputs["text"], axis=0, return_inverse=True)
            groups = groups.reshape(-1)
        else:
            groups = np.arange(len(next(iter(inputs.values()))))
        for first, second in pairs:
            a, b = embeddings(first, inputs[first]), embeddings(second, inputs[second])
            similarity = a @ b.T  # [N, N]
            for k in recall_at:
                results[f"eval/{first}2{second}_recall@{k}"] = recall_at_k(similarity, groups, groups, k)
                results[f"eval/{second}2{first}_recall@{k}"] = recall_at_k(
                    similarity.T, groups, groups, k
                )
            results[f"eval/{first}_{second}_gap"] = modality_gap(a, b)
    return results
