"""Evaluation of a trained contrastive model: zero-shot classification, retrieval, modality gap.

All metrics are computed from L2-normalised embeddings of a held-out split:
- zero-shot top-1: each class is the normalised mean of its prompt embeddings
  (prompt ensembling, Radford et al. 2021); an image is assigned the class with
  the highest cosine similarity.
- recall@K: image->text and text->image. A retrieved item counts as a hit when
  its caption is identical to the query's paired caption (datasets repeat
  captions; COCO-style evaluation counts each of an image's captions likewise).
- modality gap: distance between the image and text embedding centroids
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


def evaluate(model, params, eval_data: dict, *, batch_size: int, recall_at=(1, 5)) -> dict:
    """All metrics on `eval_data` (keys: images, texts, labels, class_texts), as {"eval/...": float}."""
    embed_image = _tower(model, params, "image")
    embed_text = _tower(model, params, "text")
    images = embed(embed_image, eval_data["images"], batch_size)
    texts = embed(embed_text, eval_data["texts"], batch_size)
    num_classes, num_prompts, max_len = eval_data["class_texts"].shape
    prompts = embed(embed_text, eval_data["class_texts"].reshape(-1, max_len), batch_size)
    classes = _normalise(prompts.reshape(num_classes, num_prompts, -1).mean(axis=1))

    # Captions with identical tokens form one group; image i's group is its caption's.
    _, caption_group = np.unique(eval_data["texts"], axis=0, return_inverse=True)
    caption_group = caption_group.reshape(-1)
    similarity = images @ texts.T  # [N, N]
    results = {"eval/zeroshot_top1": zeroshot_top1(images, classes, eval_data["labels"])}
    for k in recall_at:
        results[f"eval/i2t_recall@{k}"] = recall_at_k(similarity, caption_group, caption_group, k)
        results[f"eval/t2i_recall@{k}"] = recall_at_k(similarity.T, caption_group, caption_group, k)
    results["eval/modality_gap"] = modality_gap(images, texts)
    return results
