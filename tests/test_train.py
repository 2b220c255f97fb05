"""The train step on the simulated 8-device mesh, and end-to-end training with resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from bigalign import sharding, train
from helpers import assert_trees_close, setup


@pytest.mark.parametrize("loss_name", ["sigmoid", "softmax"])
def test_sharded_loss_and_gradients_match_single_device(tiny_config, loss_name):
    tiny_config.loss.name = loss_name
    batch = train.random_batch(tiny_config, np.random.default_rng())
    results = []
    for shards in (8, 1):
        mesh, model, _, state = setup(tiny_config, shards)
        loss_fn = train.make_loss_fn(tiny_config, model, mesh)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, state.rng)[0]))
        results.append(grad_fn(state.params, sharding.global_batch(batch, mesh)))
    (loss8, grads8), (loss1, grads1) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    assert_trees_close(grads8, grads1, rtol=1e-5)


def test_alignment_and_uniformity_terms_are_added_with_their_weights(tiny_config):
    batch = train.random_batch(tiny_config, np.random.default_rng())
    mesh, model, _, state = setup(tiny_config, 8)
    plain_loss, outputs = train.make_loss_fn(tiny_config, model, mesh)(
        state.params, sharding.global_batch(batch, mesh), state.rng
    )
    tiny_config.loss.alignment_weight, tiny_config.loss.uniformity_weight = 1.5, 0.5
    weighted_loss, _ = train.make_loss_fn(tiny_config, model, mesh)(
        state.params, sharding.global_batch(batch, mesh), state.rng
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
    mesh, model, optimizer, state = setup(tiny_config, 8)
    step = train.make_train_step(tiny_config, model, optimizer, mesh)
    batch = sharding.global_batch(train.random_batch(tiny_config, np.random.default_rng()), mesh)
    assert "all-gather" in step.lower(state, batch).compile().as_text()  # negatives cross devices
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
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
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train.train_and_evaluate(tiny_config, str(straight_dir))
    assert "Starting a new run" in capsys.readouterr().out
    for key in ("eval/zeroshot_top1", "eval/i2t_recall@1", "eval/t2i_recall@1"):
        assert 0.0 <= straight[key] <= 1.0
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
