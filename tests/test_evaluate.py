"""The evaluators' metrics against direct NumPy computations on small embeddings: ties,
several captions per image, more classes than prompts, exact leave-one-out ridge."""

import numpy as np
import pytest

from bigalign import sharding
from bigalign.config import base_config
from bigalign.evaluators import geometry, linear_probe, ranking, retrieval, zeroshot
from helpers import random_seed


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(base_config().mesh)  # the 8 simulated devices


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def coarse_grid(rng, n, e):
    """Vectors with entries in {-1/2, 0, 1/2}: every dot product is exact in float32 in
    any summation order, so equal similarities are exact ties on the device too (unit
    vectors made of them were not: k / sqrt(a * b) rounds differently for each a, b)."""
    x = rng.integers(-1, 2, size=(n, e)).astype(np.float32) / 2
    x[np.all(x == 0, axis=1), 0] = 0.5
    return x


def test_top_k_ranks_like_a_stable_sort_with_ties_across_blocks(mesh, monkeypatch):
    rng = np.random.default_rng(random_seed())
    monkeypatch.setattr(ranking, "QUERY_BLOCK", 16)  # several blocks, the last one padded
    queries, candidates = coarse_grid(rng, 45, 3), coarse_grid(rng, 30, 3)
    # Exact ties: dot products of grid vectors take few distinct values, all exact.
    similarity = queries.astype(np.float64) @ candidates.T.astype(np.float64)
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :7]
    ranked = ranking.top_k(queries, candidates, 7, mesh)
    assert ranked.shape == (45, 7)
    np.testing.assert_array_equal(ranked, expected)
    assert ranking.top_k(queries, candidates[:4], 10, mesh).shape == (45, 4)  # k capped at N


def test_recall_with_several_captions_per_image_matches_a_loop(mesh):
    rng = np.random.default_rng(random_seed())
    images = 25
    owner = np.sort(np.concatenate([np.arange(images), rng.integers(0, images, size=40)]))
    image_x, text_x = unit(rng, images, 8), unit(rng, len(owner), 8)
    tokens = rng.integers(0, 1000, size=(len(owner), 5))  # distinct captions
    text_keys, image_keys = retrieval.caption_keys(owner, tokens, images, "owner")
    # Ranked once to the deepest k, as the evaluator does; recall@k reads the first k.
    i2t = retrieval.hits(ranking.top_k(image_x, text_x, 10, mesh), image_keys, text_keys)
    t2i = retrieval.hits(ranking.top_k(text_x, image_x, 10, mesh), text_keys, image_keys)
    for k in (1, 3, 10):
        expected_i2t = np.mean([
            any(owner[t] == i for t in np.argsort(-(image_x[i] @ text_x.T), kind="stable")[:k])
            for i in range(images)])
        expected_t2i = np.mean([
            owner[t] in np.argsort(-(text_x[t] @ image_x.T), kind="stable")[:k]
            for t in range(len(owner))])
        assert retrieval.recall_at_k(i2t, k) == expected_i2t
        assert retrieval.recall_at_k(t2i, k) == expected_t2i


def test_identical_captions_count_as_hits(mesh):
    rng = np.random.default_rng(random_seed())
    n = 40
    owner = np.arange(n)
    tokens = rng.integers(0, 6, size=(n, 1))  # 6 distinct captions, repeated
    image_x, text_x = unit(rng, n, 8), unit(rng, n, 8)
    text_keys, image_keys = retrieval.caption_keys(owner, tokens, n, "identical")
    hit = retrieval.hits(ranking.top_k(image_x, text_x, 5, mesh), image_keys, text_keys)
    for k in (1, 5):
        expected = np.mean([
            any((tokens[t] == tokens[i]).all() for t in np.argsort(-(image_x[i] @ text_x.T), kind="stable")[:k])
            for i in range(n)])
        assert retrieval.recall_at_k(hit, k) == expected
    # Several captions per image, repeated across images: an image is a hit for any caption
    # identical to one of its own, a caption for any image that has an identical one.
    owner = np.sort(np.concatenate([np.arange(n), rng.integers(0, n, size=30)]))
    tokens = rng.integers(0, 12, size=(len(owner), 1))
    text_x = unit(rng, len(owner), 8)
    text_keys, image_keys = retrieval.caption_keys(owner, tokens, n, "identical")
    own = [{int(tokens[t, 0]) for t in np.flatnonzero(owner == i)} for i in range(n)]
    i2t = retrieval.hits(ranking.top_k(image_x, text_x, 5, mesh), image_keys, text_keys)
    t2i = retrieval.hits(ranking.top_k(text_x, image_x, 5, mesh), text_keys, image_keys)
    for k in (1, 5):
        expected_i2t = np.mean([
            any(int(tokens[t, 0]) in own[i] for t in np.argsort(-(image_x[i] @ text_x.T), kind="stable")[:k])
            for i in range(n)])
        expected_t2i = np.mean([
            any(int(tokens[t, 0]) in own[i] for i in np.argsort(-(text_x[t] @ image_x.T), kind="stable")[:k])
            for t in range(len(owner))])
        assert retrieval.recall_at_k(i2t, k) == expected_i2t
        assert retrieval.recall_at_k(t2i, k) == expected_t2i
    # Identical embeddings retrieve themselves: perfect recall@1 both ways.
    keys_owner = retrieval.caption_keys(np.arange(n), tokens[:n], n, "owner")
    assert retrieval.recall_at_k(retrieval.hits(ranking.top_k(image_x, image_x, 1, mesh),
                                                keys_owner[1], keys_owner[0]), 1) == 1.0


def test_zeroshot_with_more_classes_than_prompts_matches_a_loop(mesh):
    rng = np.random.default_rng(random_seed())
    num_classes, num_prompts, n = 30, 3, 200
    prompts = unit(rng, num_classes, num_prompts, 8)
    images, labels = unit(rng, n, 8), rng.integers(0, num_classes, size=n)
    classes = zeroshot.class_embeddings(prompts)
    ranked = ranking.top_k(images, classes, 5, mesh)
    centroids = [prompts[c].mean(0) / np.linalg.norm(prompts[c].mean(0)) for c in range(num_classes)]
    scores = np.array([[images[i] @ centroids[c] for c in range(num_classes)] for i in range(n)])
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in (1, 5):
        expected = np.mean([labels[i] in order[i, :k] for i in range(n)])
        assert zeroshot.top_k_accuracy(ranked, labels, k) == pytest.approx(expected)


def test_zeroshot_is_perfect_when_aligned_and_near_chance_when_shuffled(mesh):
    rng = np.random.default_rng(random_seed())
    num_classes, n = 20, 2000
    classes = unit(rng, num_classes, 32)
    labels = rng.integers(0, num_classes, size=n)
    images = classes[labels] + 0.05 * rng.normal(size=(n, 32)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    ranked = ranking.top_k(images, classes, 5, mesh)
    assert zeroshot.top_k_accuracy(ranked, labels, 1) == 1.0
    shuffled = rng.permutation(labels)
    accuracy = zeroshot.top_k_accuracy(ranked, shuffled, 1)
    # Chance is 1/20; a binomial with n = 2000 stays within 5 standard deviations.
    assert abs(accuracy - 1 / num_classes) < 5 * np.sqrt(0.05 * 0.95 / n), accuracy


def test_geometry_metrics_match_direct_computation(mesh, monkeypatch):
    rng = np.random.default_rng(random_seed())
    monkeypatch.setattr(ranking, "QUERY_BLOCK", 24)
    n = 50
    x, y = unit(rng, n, 6), unit(rng, n, 6)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert geometry.gap(x, y) == pytest.approx(np.linalg.norm(x64.mean(0) - y64.mean(0)), rel=1e-5)
    assert geometry.positive_cosine(x, y) == pytest.approx(np.mean([x64[i] @ y64[i] for i in range(n)]), rel=1e-5)
    negatives = [x64[i] @ y64[j] for i in range(n) for j in range(n) if i != j]
    assert geometry.negative_cosine(x, y) == pytest.approx(np.mean(negatives), rel=1e-5, abs=1e-7)
    assert geometry.alignment(x, y) == pytest.approx(np.mean([np.sum((x64[i] - y64[i]) ** 2) for i in range(n)]), rel=1e-5)
    distances = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    off_diagonal = ~np.eye(n, dtype=bool)
    expected = np.log(np.mean(np.exp(-2 * distances[off_diagonal])))
    assert geometry.uniformity(x, mesh) == pytest.approx(expected, rel=1e-5)
    singular = np.linalg.svd(x64, compute_uv=False)
    p = singular / singular.sum()
    assert geometry.effective_rank(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    # One direction: rank 1; an orthonormal basis: rank E.
    assert geometry.effective_rank(np.tile(x[:1], (10, 1))) == pytest.approx(1.0, abs=1e-4)
    assert geometry.effective_rank(np.eye(6)) == pytest.approx(6.0)


def test_ridge_leave_one_out_equals_refitting_without_each_example():
    rng = np.random.default_rng(random_seed())
    n, e, c = 30, 5, 4
    x, labels = rng.normal(size=(n, e)), rng.integers(0, c, size=n)
    targets = 2.0 * np.eye(c)[labels] - 1.0
    probe = linear_probe.RidgeProbe(x, targets)
    for l2 in (0.01, 1.0, 100.0):
        # Direct: ridge with an unpenalised intercept, fit on all but i.
        expected = []
        for i in range(n):
            keep = np.arange(n) != i
            xm, ym = x[keep].mean(0), targets[keep].mean(0)
            xc = x[keep] - xm
            w = np.linalg.solve(xc.T @ xc + l2 * np.eye(e), xc.T @ (targets[keep] - ym))
            expected.append((x[i] - xm) @ w + ym)
        np.testing.assert_allclose(probe.leave_one_out(l2), np.array(expected), rtol=1e-8, atol=1e-10)
        xc = x - x.mean(0)
        w = np.linalg.solve(xc.T @ xc + l2 * np.eye(e), xc.T @ (targets - targets.mean(0)))
        test_x = rng.normal(size=(7, e))
        np.testing.assert_allclose(probe.predict(test_x, l2), (test_x - x.mean(0)) @ w + targets.mean(0),
                                   rtol=1e-8, atol=1e-10)


def test_probe_picks_the_strength_with_the_best_leave_one_out_accuracy():
    rng = np.random.default_rng(random_seed())
    n, e, c = 60, 8, 3
    centres = rng.normal(size=(c, e))
    labels = rng.integers(0, c, size=n)
    x = centres[labels] + 1.5 * rng.normal(size=(n, e))
    test_labels = rng.integers(0, c, size=40)
    test_x = centres[test_labels] + 1.5 * rng.normal(size=(40, e))
    targets = 2.0 * np.eye(c)[labels] - 1.0
    probe = linear_probe.RidgeProbe(x, targets)
    loo = [np.mean(probe.leave_one_out(l2).argmax(1) == labels) for l2 in linear_probe.L2_REGS]
    best = linear_probe.L2_REGS[int(np.argmax(loo))]
    expected = np.mean(probe.predict(test_x, best).argmax(1) == test_labels)
    assert linear_probe.probe_accuracy(x, labels, test_x, test_labels, c) == expected
    # Well-separated classes are probed perfectly.
    far = centres * 100
    assert linear_probe.probe_accuracy(far[labels] + rng.normal(size=(n, e)), labels,
                                       far[test_labels] + rng.normal(size=(40, e)), test_labels, c) == 1.0


def test_few_shot_draws_that_many_of_each_class():
    rng = np.random.default_rng(random_seed())
    labels = rng.integers(0, 5, size=100)
    labels[:2] = 4  # class 4 may have fewer than 3: then all of it
    chosen = linear_probe.few_shot_indices(labels, 3, rng)
    counts = np.bincount(labels[chosen], minlength=5)
    assert all(counts[c] == min(3, np.sum(labels == c)) for c in range(5))
    assert len(np.unique(chosen)) == len(chosen)
