"""The train step on the simulated 8-device mesh, and end-to-end training with resume."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bigalign
from bigalign import config as config_lib, step, train
from bigalign.optimizer import make_optimizer
from helpers import random_global_batch, random_seed, recomputed, setup


def test_alignment_and_uniformity_terms_are_added_with_their_weights(tiny_config):
    run, state = setup(tiny_config, 8)
    batch = run.random_batch(np.random.default_rng(random_seed()))
    plain_loss, _ = step.make_loss_fn(tiny_config, run.model, run.mesh)(
        state.params, run.global_batch(batch), state.rng
    )
    outputs = run.model.apply({"params": state.params}, batch)
    tiny_config.loss.alignment_weight, tiny_config.loss.uniformity_weight = 1.5, 0.5
    weighted_loss, _ = step.make_loss_fn(tiny_config, run.model, run.mesh)(
        state.params, run.global_batch(batch), state.rng
    )
    image, text = (np.asarray(outputs["embeddings"][m], np.float64) for m in ("image", "text"))

    def uniformity(x):  # log mean over i != j of exp(-2 ||x_i - x_j||^2)
        distances = ((x[:, None] - x[None]) ** 2).sum(-1)
        off_diagonal = ~np.eye(len(x), dtype=bool)
        return np.log(np.mean(np.exp(-2 * distances[off_diagonal])))

    alignment = np.mean(((image - text) ** 2).sum(-1))
    expected = plain_loss + 1.5 * alignment + 0.5 * (uniformity(image) + uniformity(text)) / 2
    np.testing.assert_allclose(weighted_loss, expected, rtol=1e-5)


def test_train_step_on_mesh_decreases_loss_on_a_fixed_batch(tiny_config):
    run, state = setup(tiny_config, 8)
    batch = random_global_batch(run, np.random.default_rng(random_seed()))
    assert "all-gather" in run.train_step.lower(state, batch).compile().as_text()  # negatives cross devices
    losses = []
    for _ in range(8):
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert int(state.step) == 8
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_end_to_end_and_resume_replays_the_same_run(tiny_config, tmp_path, capsys):
    tiny_config.seed = seed = random_seed()
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train.train_and_evaluate(tiny_config, str(straight_dir))
    assert "Starting a new run" in capsys.readouterr().out
    assert {"eval/zeroshot/image_top1", "eval/retrieval/text2image_recall@5", "eval/geometry/image_text_gap"} <= straight.keys()
    assert straight == recomputed(straight_dir), f"seed {seed}"
    records = read_metrics(straight_dir)
    assert all("step" in r for r in records)
    straight_losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert sorted(straight_losses) == [5, 10, 15, 20]

    # A run that died after its step-10 checkpoint: the workdir as it was then.
    shutil.copytree(straight_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "20")
    with open(resumed_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= 10 and "train/loss" in r)

    resumed = train.train_and_evaluate(tiny_config, str(resumed_dir))
    assert "Resuming from the checkpoint at step 10" in capsys.readouterr().out
    resumed_losses = {
        r["step"]: r["train/loss"] for r in read_metrics(resumed_dir) if "train/loss" in r
    }
    assert resumed_losses == straight_losses  # bit-identical: same data, same updates
    assert resumed == straight


def kernels_of_a_block(block):
    layer = [f"['encoder']['encoder']['{block}']['attention']['{p}']['kernel']"
             for p in ("query", "key", "value", "out")]
    return layer + [f"['encoder']['encoder']['{block}']['mlp']['{p}']['kernel']" for p in ("fc1", "fc2")]


@pytest.mark.parametrize("scan_layers, mask", [(False, "kernels_and_embeddings"),
                                                (True, "kernels_and_embeddings"),
                                                (True, "kernels"),
                                                (False, "all_but_gains_and_biases")])
def test_weight_decay_applies_to_the_parameters_of_its_mask(tiny_config, scan_layers, mask):
    """With zero gradients AdamW's only update is the decay: exactly these params move."""
    tiny_config.model.scan_layers, tiny_config.optimizer.warmup_steps = scan_layers, 0
    tiny_config.optimizer.weight_decay_mask = mask
    tiny_config.model.image.pool = "cls"  # a class token, which open_clip does not decay
    run = bigalign.build(tiny_config)
    params = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), run.abstract_state().params)
    first_update = jax.jit(lambda params: run.optimizer.update(
        jax.tree.map(jnp.zeros_like, params), run.optimizer.init(params), params)[0])
    updates = first_update(params)
    moved = {jax.tree_util.keystr(path) for path, u in jax.tree_util.tree_leaves_with_path(updates)
             if np.any(u != 0)}
    kernels = {f"['{tower}']{name}" for tower in ("image", "text")
               for name in ["['projection']['kernel']",
                            *kernels_of_a_block("blocks" if scan_layers else "block0")]}
    kernels.add("['image']['encoder']['patch_embed']['kernel']")
    token_table = {"['text']['encoder']['token_embed']['embedding']"}
    positions = {f"['{tower}']['encoder']['position_embedding']" for tower in ("image", "text")}
    expected = {"kernels": kernels, "kernels_and_embeddings": kernels | token_table,
                "all_but_gains_and_biases": kernels | token_table | positions}[mask]
    assert moved == expected


def numpy_adamw(params, grads_per_step, decays, opt, schedule):
    """The parameters after AdamW steps with decoupled weight decay, in float64: the
    global-norm clip (none when opt.grad_clip_norm is 0), Adam's bias-corrected moments,
    and per `opt.weight_decay_mode` the step lr(t) * (direction + wd * p) (optax, torch)
    or lr(t) / peak * (peak * direction + wd * p) (big_vision/optax.py)."""
    params = {k: np.asarray(p, np.float64) for k, p in params.items()}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
        clip = min(1.0, opt.grad_clip_norm / norm) if opt.grad_clip_norm else 1.0
        rate = schedule(t - 1)
        for k, p in params.items():
            g = clip * np.asarray(grads[k], np.float64)
            m[k] = opt.b1 * m[k] + (1 - opt.b1) * g
            v[k] = opt.b2 * v[k] + (1 - opt.b2) * g**2
            direction = (m[k] / (1 - opt.b1**t)) / (np.sqrt(v[k] / (1 - opt.b2**t)) + opt.eps)
            decay = opt.weight_decay * p if k in decays else 0.0
            if opt.weight_decay_mode == "optax":
                params[k] = p - rate * (direction + decay)
            else:
                multiplier = rate / opt.learning_rate
                params[k] = p - multiplier * (opt.learning_rate * direction + decay)
    return params


def numpy_schedule(opt, total_steps):
    """Linear warmup from 0 to the peak, then cosine down to end_learning_rate_fraction."""
    def rate(step):
        if step < opt.warmup_steps:
            return opt.learning_rate * step / opt.warmup_steps
        progress = (step - opt.warmup_steps) / (total_steps - opt.warmup_steps)
        end = opt.end_learning_rate_fraction
        return opt.learning_rate * (end + (1 - end) * 0.5 * (1 + np.cos(np.pi * progress)))
    return rate


@pytest.mark.parametrize("mode, mask, clip, eps, decays", [
    ("optax", "kernels_and_embeddings", 0.5, 1e-8, {"kernel", "embedding"}),
    ("big_vision", "kernels", 0.0, 1e-6, {"kernel"}),
    ("big_vision", "all_but_gains_and_biases", 100.0, 1e-8,
     {"kernel", "embedding", "position_embedding"}),
])
def test_adamw_steps_match_numpy_in_each_weight_decay_convention(mode, mask, clip, eps, decays):
    config = config_lib.base_config()
    config.total_steps = 6
    config.optimizer.update(learning_rate=0.02, warmup_steps=2, end_learning_rate_fraction=0.1,
                            b1=0.8, b2=0.9, eps=eps, weight_decay=0.3, grad_clip_norm=clip,
                            weight_decay_mode=mode, weight_decay_mask=mask)
    # Each parameter's path in a small tree named like bigalign's, and its shape.
    paths = {"kernel": ("dense", "kernel"), "bias": ("dense", "bias"),
             "embedding": ("token_embed", "embedding"), "position_embedding": ("position_embedding",),
             "scale": ("ln", "scale"), "logit_scale": ("logit_scale",)}
    shapes = {"kernel": (3, 4), "bias": (4,), "embedding": (5, 3), "position_embedding": (1, 2, 3),
              "scale": (3,), "logit_scale": ()}

    def tree(flat):
        nested = {}
        for name, path in paths.items():
            node = nested
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = flat[name]
        return nested

    def leaf(nested, name):
        for key in paths[name]:
            nested = nested[key]
        return nested

    rng = np.random.default_rng(random_seed())
    draw = lambda: {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    params, grads_per_step = draw(), [draw() for _ in range(5)]

    optimizer = make_optimizer(config)
    updated = tree(params)
    state = optimizer.init(updated)
    update = jax.jit(optimizer.update)
    for grads in grads_per_step:
        updates, state = update(tree(grads), state, updated)
        updated = optax.apply_updates(updated, updates)

    expected = numpy_adamw(params, grads_per_step, decays, config.optimizer,
                           numpy_schedule(config.optimizer, config.total_steps))
    for name in paths:
        np.testing.assert_allclose(leaf(updated, name), expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_three_towers_train_on_the_sum_of_pair_losses_and_evaluate_every_pair(tiny_config, tmp_path):
    tiny_config.model.audio = config_lib.tower_config(
        "audio", width=32, depth=1, num_heads=2, mlp_dim=64
    )
    tiny_config.loss.pairs = (("image", "text"), ("audio", "text"))
    tiny_config.total_steps, tiny_config.log_every = 4, 2
    tiny_config.seed = seed = random_seed()
    results = train.train_and_evaluate(tiny_config, str(tmp_path))
    assert {"eval/zeroshot/audio_top1", "eval/zeroshot/image_top1", "eval/retrieval/audio2image_recall@1",
            "eval/retrieval/text2audio_recall@5", "eval/geometry/audio_text_gap"} <= results.keys()
    assert results == recomputed(tmp_path), f"seed {seed}"
    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(records) == 2
    for r in records:
        pair_sum = r["train/loss/image_text"] + r["train/loss/audio_text"]
        np.testing.assert_allclose(r["train/loss"], pair_sum, rtol=1e-6)
