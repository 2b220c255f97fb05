"""Helpers shared by the tests: the model and state on a mesh, tree comparison, seeds, jaxprs."""

import os
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import bigalign


def saved_params(workdir, step: int) -> dict:
    """The parameter tree of a run's checkpoint at `step`, read as saved (no model built)."""
    path = os.path.join(str(workdir), "checkpoints", str(step), "state")
    return ocp.PyTreeCheckpointer().restore(path)["params"]


def setup(config, data_shards: int, fsdp: int = 1, *, state_cache: dict | None = None):
    """(run, initial TrainState) for `config` on a (data_shards, fsdp) mesh, via bigalign.build.

    With `state_cache`, the initial state is built once per mesh shape and copied after:
    for tests whose configs share the seed, towers and optimizer structure (dropout, the
    loss and the learning rate do not change it), since compiling it takes seconds.
    """
    config.mesh.data, config.mesh.fsdp = data_shards, fsdp
    run = bigalign.build(config)
    if state_cache is None:
        return run, run.init_state()
    if (data_shards, fsdp) not in state_cache:
        state_cache[data_shards, fsdp] = run.init_state()
    return run, jax.tree.map(jnp.copy, state_cache[data_shards, fsdp])


def random_global_batch(run, rng: np.random.Generator) -> dict:
    """A random batch of the run's shapes, as global arrays on its mesh."""
    return run.global_batch(run.random_batch(rng))


KEY_BIASES = "['key']['bias']"  # 0 in exact math: softmax over keys ignores a shift common to all


def assert_trees_close(actual, expected, *, rtol: float, noise=()) -> None:
    """Leaf by leaf: |a - e| <= rtol * (|e| + max |e| of that leaf), the error naming the leaf.

    Leaves whose path contains a string of `noise` are 0 in exact math and float32 rounding
    noise in practice (KEY_BIASES; the logit bias under softmax): they must agree within
    rtol x the largest |e| of the whole tree. So must the rest of a scalar leaf (the
    logit scale's gradient): it has no other elements to set its scale, and as a sum over
    the whole batch with cancellation it can be far smaller than its terms.
    """
    paths = jax.tree_util.tree_leaves_with_path(expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    noise_atol = rtol * max(float(np.max(np.abs(e))) for _, e in paths)
    for (path, e), a in zip(paths, jax.tree.leaves(actual)):
        where = jax.tree_util.keystr(path)
        e = np.asarray(e)
        is_noise = any(part in where for part in noise)
        atol = noise_atol if is_noise or e.size == 1 else rtol * float(np.max(np.abs(e), initial=0.0))
        np.testing.assert_allclose(a, e, rtol=0 if is_noise else rtol, atol=atol, err_msg=where)


def random_seed() -> int:
    """A seed from numpy's global RNG, which conftest seeds per test from the session seed
    (BIGALIGN_TEST_SEED): fresh data every session, reproducible from the seed it reports."""
    return int(np.random.randint(0, 2**31 - 1))


def equations(jaxpr):
    """Every equation of a (closed) jaxpr, those of nested jaxprs (jit, scan, shard_map,
    custom_vjp, ...) included."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    yield from equations(sub)


def dtypes(variables) -> tuple:
    return tuple(np.dtype(v.aval.dtype) for v in variables if hasattr(v.aval, "dtype"))


WORDS = ("red", "blue", "green", "cat", "dog", "bird", "on", "a", "the", "grass", "sofa", "sky")


def write_image_folder(folder, count: int, rng: np.random.Generator, *, truncated=()) -> str:
    """`count` random PNGs of varied sizes under folder/images and an open_clip-style CSV
    index (filepath,caption; paths relative to the CSV). Rows in `truncated` get a PNG cut
    in half. Returns the CSV's path."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["filepath,caption"]
    for i in range(count):
        height, width = (int(v) for v in rng.integers(24, 64, size=2))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = folder / "images" / f"{i:04d}.png"
        Image.fromarray(pixels).save(path)
        if i in truncated:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))
        rows.append(f"images/{i:04d}.png,{caption}")
    index = folder / "index.csv"
    index.write_text("\n".join(rows) + "\n")
    return str(index)


def write_sound_folder(folder, count: int, rng: np.random.Generator, *, rate: int = 16000) -> str:
    """`count` 16-bit mono WAVs of random tones and lengths (0.2-0.8 s) under folder/sounds
    and a CSV index with columns sound,caption. Returns the CSV's path."""
    import wave

    (folder / "sounds").mkdir(parents=True, exist_ok=True)
    rows = ["sound,caption"]
    for i in range(count):
        t = np.arange(int(rng.integers(rate // 5, 4 * rate // 5))) / rate
        samples = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
        with wave.open(str(folder / "sounds" / f"{i:04d}.wav"), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))
        rows.append(f"sounds/{i:04d}.wav,{caption}")
    index = folder / "sounds.csv"
    index.write_text("\n".join(rows) + "\n")
    return str(index)


def _stable_top(similarity: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def _ridge_probe_accuracy(train_x, train_labels, test_x, test_labels, num_classes, l2_regs):
    """Ridge to +-1 one-hot targets with an intercept; strength by leave-one-out accuracy
    from the hat matrix (inverse, not eigendecomposition), strongest first on ties."""
    y = 2.0 * np.eye(num_classes)[train_labels] - 1.0
    xm, ym = train_x.mean(0), y.mean(0)
    xc = train_x - xm
    best, best_score = None, -1.0
    for l2 in l2_regs:
        inverse = np.linalg.inv(xc.T @ xc + l2 * np.eye(xc.shape[1]))
        w = inverse @ xc.T @ (y - ym)
        fitted = xc @ w + ym
        leverage = 1 / len(y) + np.sum((xc @ inverse) * xc, axis=1)
        loo = (fitted - leverage[:, None] * y) / (1 - leverage)[:, None]
        score = np.mean(loo.argmax(1) == train_labels) if len(y) > 1 else 0.0
        if score > best_score:
            best, best_score = w, score
    return np.mean(((test_x - xm) @ best + ym).argmax(1) == test_labels)


def recomputed_metrics(workdir) -> dict:
    """The final eval metrics recomputed in numpy from the params checkpointed in `workdir`
    and the held-out sets embedded as the evaluators embed them (default evals options)."""
    from bigalign import evaluators
    from bigalign.data import held_out
    from bigalign.evaluators import linear_probe

    model = bigalign.load(str(workdir))
    context = evaluators.Context(model.run, model.params)
    config, metrics = model.config, {}
    ks = config.evals.retrieval.recall_at
    pairs = context.pairs()
    x = pairs.embeddings
    # A retrieved item is a hit when its caption's tokens equal the query's (first captions).
    same = (pairs.caption_tokens[:, None] == pairs.caption_tokens[None]).all(-1)
    names = list(x)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = x[first].astype(np.float64), x[second].astype(np.float64)
            relation = same if "text" in (first, second) else np.eye(len(a), dtype=bool)
            for query, candidate, similarity in ((first, second, a @ b.T), (second, first, b @ a.T)):
                top = _stable_top(similarity, max(ks))
                for k in ks:
                    hits = [relation[q, top[q, :k]].any() for q in range(len(a))]
                    metrics[f"eval/retrieval/{query}2{candidate}_recall@{k}"] = np.mean(hits)
            n = len(a)
            prefix = f"eval/geometry/{first}_{second}"
            metrics[f"{prefix}_gap"] = np.sqrt(np.sum((a.mean(0) - b.mean(0)) ** 2))
            metrics[f"{prefix}_positive_cosine"] = np.mean(np.sum(a * b, 1))
            metrics[f"{prefix}_negative_cosine"] = ((a @ b.T).sum() - np.trace(a @ b.T)) / (n * (n - 1))
            metrics[f"{prefix}_alignment"] = np.mean(np.sum((a - b) ** 2, 1))
    for name, values in x.items():
        v = values.astype(np.float64)
        distances = np.sum((v[:, None] - v[None]) ** 2, -1)[~np.eye(len(v), dtype=bool)]
        metrics[f"eval/geometry/{name}_uniformity"] = np.log(np.mean(np.exp(-2 * distances)))
        p = np.linalg.svd(v, compute_uv=False)
        p = p / p.sum()
        p = p[p > 0]  # 0 log 0 = 0: fewer distinct texts than rows leaves exact zeros
        metrics[f"eval/geometry/{name}_effective_rank"] = np.exp(-np.sum(p * np.log(p)))
    metrics["eval/geometry/logit_scale"] = model.logit_scale
    metrics["eval/geometry/logit_bias"] = model.logit_bias
    labelled = context.classes()
    if labelled is not None:
        prompts = held_out.class_texts(config.data, labelled.spec, labelled.class_names)
        tokens = model.tokenizer.encode([t for group in prompts for t in group], config.text.max_len)
        embedded = context.embed("text", tokens).reshape(len(prompts), len(prompts[0]), -1)
        centroids = embedded.mean(1)
        centroids /= np.linalg.norm(centroids, axis=-1, keepdims=True)
        probe = config.evals.linear_probe
        train = context.classes(split=probe.train_split, limit=probe.num_train)
        for modality, values in labelled.embeddings.items():
            top = _stable_top(values @ centroids.T, 5)
            for k in (1, 5):
                metrics[f"eval/zeroshot/{modality}_top{k}"] = np.mean(
                    [labelled.labels[i] in top[i, :k] for i in range(len(values))])
            rng = np.random.default_rng(config.seed)  # the same shots for every modality
            for shots in probe.shots:
                chosen = linear_probe.few_shot_indices(train.labels, shots, rng)
                metrics[f"eval/linear_probe/{modality}_{shots}shot_top1"] = _ridge_probe_accuracy(
                    train.embeddings[modality][chosen].astype(np.float64), train.labels[chosen],
                    values, labelled.labels, len(labelled.class_names), linear_probe.L2_REGS)
            metrics[f"eval/linear_probe/{modality}_full_top1"] = _ridge_probe_accuracy(
                train.embeddings[modality].astype(np.float64), train.labels, values,
                labelled.labels, len(labelled.class_names), linear_probe.L2_REGS)
    return metrics


def recomputed(workdir):
    """`recomputed_metrics(workdir)` as a `pytest.approx`: the device's float32 against
    numpy's float64, to 1e-5 relative, and 1e-6 absolute for the metrics that sit near 0
    (the uniformity of a barely trained tower, -0.026, differed by 2.7e-7 once)."""
    return pytest.approx(recomputed_metrics(workdir), rel=1e-5, abs=1e-6)


def held_out_run(data_config, tokenizer, *, max_len: int, batch_size: int):
    """What held_out.embed_set reads of a run: config.data, config.eval.batch_size,
    config.text.max_len and the tokenizer."""
    config = types.SimpleNamespace(data=data_config,
                                   eval=types.SimpleNamespace(batch_size=batch_size),
                                   text=types.SimpleNamespace(max_len=max_len))
    return types.SimpleNamespace(config=config, tokenizer=tokenizer)


class PreparedInputs:
    """An `embed` for held_out.embed_set whose embeddings are the prepared inputs
    themselves, flattened to float32 rows; records each call's (batch, dtype, shape)."""

    def __init__(self):
        self.calls = {}

    def __call__(self, modality: str, inputs: np.ndarray) -> np.ndarray:
        self.calls.setdefault(modality, []).append((len(inputs), inputs.dtype, inputs.shape[1:]))
        return inputs.reshape(len(inputs), -1).astype(np.float32)
