"""The train step on the simulated 8-device mesh, and end-to-end training with resume."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bigalign
from bigalign import config as config_lib, step, train
from helpers import random_global_batch, random_seed, recomputed_metrics, setup


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
    assert straight == pytest.approx(recomputed_metrics(straight_dir), rel=1e-5), f"seed {seed}"
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


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_applies_to_kernels_and_token_table_only(tiny_config, scan_layers):
    """With zero gradients AdamW's only update is the decay: exactly these params move."""
    tiny_config.model.scan_layers, tiny_config.optimizer.warmup_steps = scan_layers, 0
    run = bigalign.build(tiny_config)
    params = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), run.abstract_state().params)
    first_update = jax.jit(lambda params: run.optimizer.update(
        jax.tree.map(jnp.zeros_like, params), run.optimizer.init(params), params)[0])
    updates = first_update(params)
    moved = {jax.tree_util.keystr(path) for path, u in jax.tree_util.tree_leaves_with_path(updates)
             if np.any(u != 0)}
    block = "blocks" if scan_layers else "block0"
    layer = [f"['encoder']['encoder']['{block}']['attention']['{p}']['kernel']"
             for p in ("query", "key", "value", "out")]
    layer += [f"['encoder']['encoder']['{block}']['mlp']['{p}']['kernel']" for p in ("fc1", "fc2")]
    expected = {f"['{tower}']{name}" for tower in ("image", "text")
                for name in ["['projection']['kernel']", *layer]}
    expected |= {"['image']['encoder']['patch_embed']['kernel']",
                 "['text']['encoder']['token_embed']['embedding']"}
    assert moved == expected


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
    assert results == pytest.approx(recomputed_metrics(tmp_path), rel=1e-5), f"seed {seed}"
    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(records) == 2
    for r in records:
        pair_sum = r["train/loss/image_text"] + r["train/loss/audio_text"]
        np.testing.assert_allclose(r["train/loss"], pair_sum, rtol=1e-6)
