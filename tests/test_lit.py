"""LiT: a frozen tower gets no gradient and no optimizer state, and can start from another run."""

import jax
import numpy as np
import optax
import pytest

from bigalign import train
from bigalign.errors import UserError
from helpers import random_global_batch, random_seed, setup


def test_frozen_tower_is_bit_identical_after_training_steps(tiny_config):
    tiny_config.model.image.frozen = True
    tiny_config.optimizer.warmup_steps = 0
    run, state = setup(tiny_config, 4, 2)
    initial = jax.device_get(state.params)
    # The optimizer holds moments for the text tower and the logit scale and bias only.
    for moment in ("mu", "nu"):
        assert set(optax.tree_utils.tree_get(state.opt_state, moment)) == {
            "text", "logit_scale", "logit_bias"
        }

    rng = np.random.default_rng(random_seed())
    for _ in range(3):
        state, metrics = run.train_step(state, random_global_batch(run, rng))
    final = jax.device_get(state.params)
    for before, after in zip(jax.tree.leaves(initial["image"]), jax.tree.leaves(final["image"])):
        np.testing.assert_array_equal(after, before)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial["text"]),
                                                        jax.tree.leaves(final["text"]))]
    assert np.mean(changed) > 0.9  # the other tower does train
    assert float(metrics["train/grad_norm"]) > 0


def test_tower_initialised_from_another_run_then_frozen(tiny_config, tmp_path, capsys):
    tiny_config.total_steps, tiny_config.checkpoint_every = 4, 4
    first = tmp_path / "first"
    train.train_and_evaluate(tiny_config, str(first))
    trained_image = jax.device_get(_saved_params(tiny_config, first)["image"])

    tiny_config.model.image.frozen = True
    tiny_config.model.image.init_from = str(first)
    tiny_config.text.tokenizer = str(first / "tokenizer.model")
    tiny_config.seed = 1  # fresh text tower
    second = tmp_path / "second"
    train.train_and_evaluate(tiny_config, str(second))
    assert f"Initialised tower 'image' from {first}" in capsys.readouterr().out
    params = _saved_params(tiny_config, second)
    for before, after in zip(jax.tree.leaves(trained_image), jax.tree.leaves(params["image"])):
        np.testing.assert_array_equal(after, before)


def test_initialising_from_a_different_model_is_a_one_line_error(tiny_config, tmp_path):
    tiny_config.total_steps, tiny_config.checkpoint_every = 2, 2
    first = tmp_path / "first"
    train.train_and_evaluate(tiny_config, str(first))
    tiny_config.model.image.update(width=48, init_from=str(first))
    with pytest.raises(UserError, match=r"holds image/.* with shape .*this model has .*init_from"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "second"))
    (tmp_path / "not_a_run").mkdir()  # (a path that does not exist fails validation first)
    tiny_config.model.image.init_from = str(tmp_path / "not_a_run")
    with pytest.raises(UserError, match="is not a bigalign run"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "third"))


def _saved_params(config, workdir):
    """The parameters in the run's latest checkpoint."""
    from bigalign import checkpoint

    _, state = setup(config, 8)
    return {
        name: checkpoint.load_initial_params(str(workdir), {name: state.params[name]}, key=name)[name]
        for name in state.params
        if name in config.model
    }
