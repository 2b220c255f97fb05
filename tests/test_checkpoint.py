"""Checkpoints round-trip the whole train state and the data iterator position."""

import jax
import numpy as np
import pytest

import bigalign
from bigalign import sharding
from bigalign.checkpoint import Checkpointer
from bigalign.data import pipeline
from bigalign.data.skipping import SKIPPED
from bigalign.errors import UserError


def build(config, tmp_path, init_seed):
    """State initialised from `init_seed` on a (4, 2) mesh; the data stream always from seed 0."""
    config.seed = init_seed
    config.mesh.fsdp = 2  # parameters and optimizer state are saved and restored sharded
    config.text.vocab_size = 64
    run = bigalign.build(config, str(tmp_path))  # trains tmp_path/tokenizer.model once
    data = iter(
        pipeline.train_dataset(
            config.data, run.tokenizer, max_len=config.text.max_len,
            global_batch_size=config.batch_size, seed=0,
        )
    )
    return run.mesh, run.init_state(), data, run.train_step


def test_save_restore_round_trips_state_and_data_position(tiny_config, tmp_path):
    mesh, state, data, step = build(tiny_config, tmp_path, init_seed=1)
    for _ in range(3):
        inputs = {key: value for key, value in next(data).items() if key != SKIPPED}
        state, _ = step(state, sharding.global_batch(inputs, mesh))
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(3, state, data)
    checkpointer.wait()
    expected_batch = next(data)

    _, fresh_state, fresh_data, _ = build(tiny_config, tmp_path, init_seed=2)  # other parameters, fresh data iterator
    restorer = Checkpointer(str(tmp_path / "ckpt"))
    assert restorer.latest_step() == 3
    restored = restorer.restore(3, fresh_state, fresh_data)
    assert int(restored.step) == 3
    saved_leaves, restored_leaves = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(saved_leaves) == len(restored_leaves)
    for saved, loaded in zip(saved_leaves, restored_leaves):
        if jax.dtypes.issubdtype(saved.dtype, jax.dtypes.prng_key):
            saved, loaded = jax.random.key_data(saved), jax.random.key_data(loaded)
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))
    restored_batch = next(fresh_data)
    for key in expected_batch:
        np.testing.assert_array_equal(expected_batch[key], restored_batch[key])


def test_restoring_a_checkpoint_of_another_model_is_a_clear_error(tiny_config, tmp_path):
    mesh, state, data, _ = build(tiny_config, tmp_path, init_seed=1)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, state, data)
    checkpointer.wait()
    tiny_config.model.image.width = 48
    _, other_state, other_data, _ = build(tiny_config, tmp_path, init_seed=1)
    with pytest.raises(UserError, match=r"holds 'params/image/encoder/\S+' with shape \(.*\), this model has"):
        Checkpointer(str(tmp_path / "ckpt")).restore(1, other_state, other_data)


def test_restoring_a_data_position_of_another_pipeline_is_a_clear_error(tiny_config, tmp_path):
    _, state, data, _ = build(tiny_config, tmp_path, init_seed=1)
    next(data)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, state, data)
    checkpointer.wait()
    tiny_config.data.num_workers = 2  # worker processes keep one position each
    _, other_state, other_data, _ = build(tiny_config, tmp_path, init_seed=1)
    try:
        with pytest.raises(UserError, match=r"the data position in checkpoint .*/1 does not fit "
                                            r"this input pipeline.*data.num_workers"):
            Checkpointer(str(tmp_path / "ckpt")).restore(1, other_state, other_data)
    finally:
        other_data.close()


def test_a_save_cut_off_midway_leaves_the_previous_checkpoint_in_use(tiny_config, tmp_path):
    _, state, data, _ = build(tiny_config, tmp_path, init_seed=1)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(3, state, data)
    checkpointer.wait()
    checkpointer.close()
    # What a process killed while writing step 7 leaves: a temporary directory, half full.
    partial = tmp_path / "ckpt" / "7.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(np.random.bytes(100))
    restorer = Checkpointer(str(tmp_path / "ckpt"))
    assert restorer.latest_step() == 3
    _, fresh_state, fresh_data, _ = build(tiny_config, tmp_path, init_seed=2)
    assert int(restorer.restore(3, fresh_state, fresh_data).step) == int(state.step)
