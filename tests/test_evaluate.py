"""Evaluation metrics against brute-force loops over random embeddings."""

import numpy as np

from bigalign import evaluate
from helpers import random_seed


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zeroshot_top1_matches_loop():
    rng = np.random.default_rng(random_seed())
    images, classes = unit(rng, 60, 8), unit(rng, 7, 8)
    labels = rng.integers(0, 7, size=60)
    expected = np.mean([max(range(7), key=lambda c: images[i] @ classes[c]) == labels[i] for i in range(60)])
    assert evaluate.zeroshot_top1(images, classes, labels) == expected


def test_recall_at_k_matches_loop_with_repeated_captions():
    rng = np.random.default_rng(random_seed())
    queries, candidates = 40, 40
    similarity = rng.normal(size=(queries, candidates))
    groups = rng.integers(0, 15, size=candidates)  # repeated captions share a group
    for k in (1, 3, 10):
        hits = []
        for q in range(queries):
            best = sorted(range(candidates), key=lambda j: -similarity[q, j])[:k]
            hits.append(any(groups[j] == groups[q] for j in best))
        assert evaluate.recall_at_k(similarity, groups, groups, k) == np.mean(hits)


def test_recall_is_perfect_for_identical_embeddings_and_chance_like_for_noise():
    rng = np.random.default_rng(random_seed())
    embeddings = unit(rng, 200, 32)
    groups = np.arange(200)
    assert evaluate.recall_at_k(embeddings @ embeddings.T, groups, groups, 1) == 1.0
    noise = unit(rng, 200, 32) @ unit(rng, 200, 32).T
    assert evaluate.recall_at_k(noise, groups, groups, 1) < 0.1


def test_modality_gap_is_centroid_distance():
    rng = np.random.default_rng(random_seed())
    a, b = unit(rng, 30, 4), unit(rng, 30, 4)
    assert np.isclose(evaluate.modality_gap(a, b), np.sqrt(((a.mean(0) - b.mean(0)) ** 2).sum()))
    assert evaluate.modality_gap(a, a) == 0.0
