"""The geometry of the embedding space: what a contrastive model has learned, beyond recall.

For every pair of towers (a, b) of a held-out set, on unit embeddings x_i = a(example i),
y_i = b(example i):
- gap: distance between the two modalities' centroids, ||mean x - mean y|| (the
  modality gap, Liang et al. 2022; the "contrastive gap", Fahim et al. 2024);
- positive_cosine: mean x_i . y_i; negative_cosine: mean x_i . y_j over i != j;
- alignment: mean ||x_i - y_i||^2 (Wang & Isola 2020, alpha = 2);
and for every tower:
- uniformity: log mean over i != j of exp(-2 ||x_i - x_j||^2) (Wang & Isola, t = 2;
  lower is more uniform; computed on the device in blocks, never as an [N, N] matrix);
- effective_rank: exp of the entropy of the normalised singular values of the [N, E]
  embeddings (Roy & Vetterli 2007; RankMe, Garrido et al. 2023), from 1 to E;
and the model's logit_scale (exp of the learnt log scale) and logit_bias.
"""

import itertools

import numpy as np

from bigalign import evaluators
from bigalign.evaluators import ranking

UNIFORMITY_T = 2.0


def gap(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x.mean(axis=0) - y.mean(axis=0)))


def positive_cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.sum(x * y, axis=1)))


def negative_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean x_i . y_j over i != j, from sums: (sum x).(sum y) counts every pair once."""
    n = len(x)
    all_pairs = float(x.sum(axis=0, dtype=np.float64) @ y.sum(axis=0, dtype=np.float64))
    positives = float(np.sum(x * y, dtype=np.float64))
    return (all_pairs - positives) / (n * (n - 1))


def alignment(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.sum((x - y) ** 2, axis=1)))


def uniformity(x: np.ndarray, mesh) -> float:
    """log mean_{i != j} exp(-t ||x_i - x_j||^2) of unit rows, t = UNIFORMITY_T."""
    n = len(x)
    row_sums = ranking.gaussian_potential_row_sums(x, UNIFORMITY_T, mesh).astype(np.float64)
    return float(np.log((row_sums.sum() - n) / (n * (n - 1))))  # each i = j term is exp(0)


def effective_rank(x: np.ndarray) -> float:
    singular = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = singular / singular.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


@evaluators.register("geometry", options={
    "data": "",  # held-out pairs; "": the run's default (as retrieval's)
})
def geometry(context, options) -> dict:
    """Gap, cosines and alignment per pair; uniformity and effective rank per tower; the logit scale and bias."""
    results = {"logit_scale": float(np.exp(context.scalar("logit_scale"))),
               "logit_bias": context.scalar("logit_bias")}
    pairs = context.pairs(options.data)
    if pairs is None or pairs.count < 2:  # no negatives, no pairs of distinct examples
        return results
    embedded = pairs.embeddings
    for a, b in itertools.combinations(embedded, 2):
        x, y = embedded[a], embedded[b]
        for name, metric in (("gap", gap), ("positive_cosine", positive_cosine),
                             ("negative_cosine", negative_cosine), ("alignment", alignment)):
            results[f"{a}_{b}_{name}"] = metric(x, y)
    for modality, x in embedded.items():
        results[f"{modality}_uniformity"] = uniformity(x, context.mesh)
        results[f"{modality}_effective_rank"] = effective_rank(x)
    return results
