"""Cross-modal retrieval: recall@K both ways for every pair of towers of a held-out set.

A query's retrieved candidate is correct when the two belong together:
- match="owner" (COCO, Flickr): a caption belongs to its image; with captions="all",
  an image query is a hit for any of its captions, and each caption has one image;
- match="identical": also any caption with the same tokens as one of the image's
  (datasets that repeat captions, such as shapes, count every repeat as correct).
Pairs without text (image-audio) match example to example. Every pair of towers is
evaluated, contrasted in training or not (binding two modalities to a third aligns
them too: ImageBind's emergent retrieval).
"""

import itertools

import numpy as np

from bigalign import evaluators
from bigalign.evaluators import ranking
from bigalign.schema import Integer, Key, OneOf, Sequence


def hits(ranked: np.ndarray, query_keys: np.ndarray, candidate_keys: np.ndarray) -> np.ndarray:
    """bool [Q, k]: whether each ranked candidate shares a key with its query.

    ranked: [Q, k] candidate indices; query_keys: [Q, Kq], candidate_keys: [N, Kc]
    int keys, -1 for none (an image has as many keys as captions).
    """
    candidates = candidate_keys[ranked]  # [Q, k, Kc]
    queries = query_keys[:, None, :, None]  # [Q, 1, Kq, 1]
    return ((queries == candidates[:, :, None, :]) & (queries >= 0)).any(axis=(2, 3))


def recall_at_k(hit: np.ndarray, k: int) -> float:
    """Fraction of queries with a hit among their first k candidates (hit: [Q, >=k])."""
    return float(np.mean(hit[:, :k].any(axis=1)))


def caption_keys(owner: np.ndarray, tokens: np.ndarray, count: int, match: str):
    """(keys of each caption [T, 1], keys of each example [N, K]) under `match`."""
    if match == "owner":  # a caption's key is its example: one key each
        return owner[:, None], np.arange(count)[:, None]
    _, key = np.unique(tokens, axis=0, return_inverse=True)
    key = key.reshape(-1)  # the same for identical captions; an example has its captions'
    per_example = [[] for _ in range(count)]
    for caption, example in enumerate(owner):
        per_example[example].append(key[caption])
    width = max(len(keys) for keys in per_example)
    example_keys = np.full((count, width), -1, np.int64)
    for example, keys in enumerate(per_example):
        example_keys[example, : len(keys)] = keys
    return key[:, None], example_keys


@evaluators.register("retrieval", options={
    "data": "",  # held-out pairs ("tfds:coco_captions/2017", "csv:PATH"); "": the run's default
    "captions": Key("first", OneOf(("first", "all"))),  # of each example
    "match": Key("identical", OneOf(("identical", "owner"))),
    "recall_at": Key((1, 5, 10), Sequence(Integer(low=1))),
})
def retrieval(context, options) -> dict:
    """`{a}2{b}_recall@K` and `{b}2{a}_recall@K` for every pair (a, b) of towers."""
    pairs = context.pairs(options.data, all_captions=options.captions == "all")
    if pairs is None:
        return {}
    identity = np.arange(pairs.count)[:, None]  # example to example
    if "text" in pairs.embeddings:
        text_keys, example_keys = caption_keys(pairs.caption_owner, pairs.caption_tokens,
                                               pairs.count, options.match)

    def keys(modality, other):
        if "text" not in (modality, other):
            return identity
        return text_keys if modality == "text" else example_keys

    deepest = max(options.recall_at)
    results = {}
    for first, second in itertools.combinations(pairs.embeddings, 2):
        for a, b in ((first, second), (second, first)):
            ranked = ranking.top_k(pairs.embeddings[a], pairs.embeddings[b], deepest, context.mesh)
            hit = hits(ranked, keys(a, b), keys(b, a))
            for k in options.recall_at:
                results[f"{a}2{b}_recall@{k}"] = recall_at_k(hit, k)
    return results
