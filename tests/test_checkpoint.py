"""Checkpoints round-trip the whole train state and the data iterator position."""

import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bigalign
from bigalign import sharding
from bigalign.checkpoint import Checkpointer
from bigalign.data import pipeline
from bigalign.data.skipping import SKIPPED
from bigalign.errors import UserError
from helpers import random_seed

TESTS = os.path.dirname(os.path.abspath(__file__))


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
    restored, data_restored = restorer.restore(3, fresh_state, fresh_data)
    assert data_restored
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


def small_state(seed: int) -> dict:
    """The state the killed process saves, and waits for, at step 3."""
    rng = np.random.default_rng(seed)
    return {"step": jnp.asarray(3, jnp.int32),
            "params": {"w": jnp.asarray(rng.standard_normal((64, 32), np.float32)),
                       "b": jnp.asarray(rng.standard_normal(32, np.float32))}}


def data_stream():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


BIG_STATE_BYTES = 4 * (64 << 20)


def save_then_start_a_big_save(directory: str, seed: int) -> None:
    """Run in a child process: saves step 3, then starts an async save of a 256 MB step 7
    and waits for it (the test kills the process while orbax is writing it)."""
    checkpointer = Checkpointer(directory)
    data = data_stream()
    for _ in range(seed % 50):
        next(data)
    checkpointer.save(3, small_state(seed), data)
    checkpointer.wait()
    rng = np.random.default_rng(seed)
    chunk = BIG_STATE_BYTES // 4
    big = {f"w{i}": jnp.asarray(np.frombuffer(rng.bytes(chunk), np.float32).reshape(1024, -1))
           for i in range(4)}
    checkpointer.save(7, big, data)
    checkpointer.wait()


def bytes_under(path) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def test_a_save_cut_off_midway_leaves_the_previous_checkpoint_in_use(tmp_path):
    """A process SIGKILLed while orbax writes step 7: step 3 stays the latest and restores exactly."""
    seed = random_seed()
    directory = tmp_path / "ckpt"
    script = (f"import sys; sys.path.insert(0, {TESTS!r}); import test_checkpoint; "
              f"test_checkpoint.save_then_start_a_big_save({str(directory)!r}, {seed})")
    process = subprocess.Popen([sys.executable, "-c", script],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    partial = directory / "7.orbax-checkpoint-tmp"  # orbax 0.12's name for step 7 until renamed
    deadline = time.monotonic() + 120
    while not (partial.is_dir() and bytes_under(partial) > (1 << 20)):  # arrays being written
        assert process.poll() is None and time.monotonic() < deadline, (
            f"seed {seed}: no partial write of step 7 seen; {sorted(os.listdir(directory))}\n"
            f"{process.communicate()[0].decode()[-3000:]}")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    written = bytes_under(partial)
    assert not (directory / "7").exists() and written < BIG_STATE_BYTES, (
        f"seed {seed}: the kill landed after the write of step 7 ({written} bytes)")

    restorer = Checkpointer(str(directory))
    assert restorer.latest_step() == 3, f"seed {seed}"
    expected, data = small_state(seed), data_stream()
    restored, data_restored = restorer.restore(3, jax.tree.map(jnp.zeros_like, expected), data)
    assert data_restored
    for saved, loaded in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded), err_msg=f"seed {seed}")
    assert next(data) == seed % 50, f"seed {seed}"
