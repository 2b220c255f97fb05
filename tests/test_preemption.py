"""Preemption and divergence: SIGTERM saves and exits 0, SIGKILL + resume is bit-identical,
non-finite steps are skipped and counted, and too many in a row stop the run."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bigalign import preemption, train
from bigalign.errors import UserError
from helpers import random_global_batch, random_seed, saved_params, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small demo run: 24 steps of batch 32, a checkpoint every 6, a progress line every step;
# no evaluators (what is compared is the training, and the final evaluation costs seconds).
RUN = ["--config.total_steps=24", "--config.checkpoint_every=6", "--config.log_every=1",
       "--config.batch_size=32", "--config.optimizer.warmup_steps=3",
       "--config.data.num_train=512", "--config.data.num_eval=64", "--config.evals={}"]
PROGRESS = re.compile(r"^step +(\d+)/24 ", re.MULTILINE)
RESUMED = re.compile(r"^Resuming from the checkpoint at step (\d+) ", re.MULTILINE)


def start_run(workdir) -> subprocess.Popen:
    """The demo's CLI trainer in `workdir`; it shares the session's compilation cache
    (conftest.py's environment), so later runs load the train step instead of compiling it."""
    return subprocess.Popen(
        [sys.executable, "-m", "bigalign.train", "--config", f"{REPO}/configs/demo.py",
         "--workdir", str(workdir), *RUN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )


def run_to_step(process: subprocess.Popen, step: int) -> list[str]:
    """Reads the run's output until its progress line for `step` (or its end)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if (progress := PROGRESS.match(line)) and int(progress[1]) >= step:
            break
    return lines


def kill(process: subprocess.Popen) -> str:
    """SIGKILLs the run; returns what it printed after the last line read."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return process.stdout.read()


def wait_for(path, seconds: float = 30) -> None:
    """Waits until `path` exists (an async checkpoint is renamed into place when complete)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def finish(process: subprocess.Popen) -> str:
    output = process.stdout.read()
    assert process.wait(timeout=300) == 0, output[-2000:]
    return output


def final_params(workdir, step: int) -> list[np.ndarray]:
    return jax.tree.leaves(saved_params(workdir, step))


def losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """One run SIGKILLed at 2 random steps, resumed after each: it must match a straight run.

    Each restart must resume from a step before the end and print a progress line for every
    step from there on: a kill that landed after training ended would fail here."""
    straight = tmp_path / "straight"
    finish(start_run(straight))
    expected_params, expected_losses = final_params(straight, 24), losses(straight)
    assert sorted(expected_losses) == list(range(1, 25))

    seed = random_seed()
    # Up to step 21: the kill lands at least 3 steps before the end (18 to 23 all resume from 18).
    kill_points = sorted(int(k) for k in np.random.default_rng(seed).choice(
        np.arange(7, 22), size=2, replace=False))
    workdir = tmp_path / "killed"
    for run_number, kill_at in enumerate([*kill_points, None]):
        process = start_run(workdir)
        output = "".join(run_to_step(process, kill_at or 24))
        if kill_at is None:
            output += finish(process)
        else:
            if run_number == 0:
                wait_for(workdir / "checkpoints" / "6")  # the first checkpoint is complete
            output += kill(process)
        where = f"run {run_number} of kill points {kill_points} (seed {seed}):\n{output[-3000:]}"
        resumed = RESUMED.findall(output)
        if run_number == 0:
            assert not resumed and "Starting a new run" in output, where
            start = 0
        else:
            assert len(resumed) == 1 and int(resumed[0]) < 24, where  # the kill interrupted training
            start = int(resumed[0])
        trained = [int(step) for step in PROGRESS.findall(output)]
        end = 24 if kill_at is None else max(trained, default=start)
        assert trained == list(range(start + 1, end + 1)), where
    assert losses(workdir) == expected_losses, f"seed {seed}"  # floats from JSON: exact equality
    for expected, got in zip(expected_params, final_params(workdir, 24), strict=True):
        np.testing.assert_array_equal(expected, got, err_msg=f"seed {seed}")


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
    process = start_run(tmp_path)
    target = int(np.random.randint(2, 15))  # 10 steps (about a second) before the end
    lines = run_to_step(process, target)
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + finish(process)
    stopped = [line for line in output.splitlines() if line.startswith("Stopped by SIGTERM")]
    assert len(stopped) == 1, output[-2000:]
    step = int(stopped[0].split("after step ")[1].split(",")[0])
    assert target <= step < 24, f"target {target}"
    assert "Evaluation" not in output
    assert os.path.isdir(tmp_path / "checkpoints" / str(step))
    # The next launch resumes from exactly there (its first step is enough to show it).
    process = start_run(tmp_path)
    output = "".join(run_to_step(process, step + 1)) + kill(process)
    assert RESUMED.findall(output) == [str(step)], output[-2000:]
    assert PROGRESS.findall(output)[:1] == [str(step + 1)], output[-2000:]


def test_a_nan_batch_is_skipped_counted_and_leaves_params_unchanged(tiny_config):
    run, state = setup(tiny_config, data_shards=8)
    step = run.train_step
    rng = np.random.default_rng(random_seed())
    good = lambda: random_global_batch(run, rng)  # noqa: E731
    state, metrics = step(state, good())
    assert int(metrics["train/skipped_steps"]) == 0
    before = jax.device_get((state.params, state.opt_state))

    batch = run.random_batch(rng)
    images = batch["image"].astype(np.float32) / 127.5 - 1  # the tower takes floats as they are
    images[int(rng.integers(len(images)))] = np.nan
    state, metrics = step(state, run.global_batch({**batch, "image": images}))
    assert not np.isfinite(float(metrics["train/loss"]))
    assert int(metrics["train/skipped_steps"]) == 1 and int(metrics["train/nonfinite_streak"]) == 1
    after = jax.device_get((state.params, state.opt_state.inner_state))
    for old, new in zip(jax.tree.leaves((before[0], before[1].inner_state)), jax.tree.leaves(after)):
        np.testing.assert_array_equal(old, new)

    state, metrics = step(state, good())
    assert int(metrics["train/skipped_steps"]) == 1 and int(metrics["train/nonfinite_streak"]) == 0
    assert np.isfinite(float(metrics["train/loss"]))


def test_a_diverging_run_stops_after_the_configured_streak_keeping_its_checkpoint(
        tiny_config, tmp_path):
    tiny_config.total_steps, tiny_config.checkpoint_every, tiny_config.log_every = 40, 1, 1
    tiny_config.optimizer.update(learning_rate=1e30, warmup_steps=0, grad_clip_norm=1e30)
    tiny_config.max_consecutive_nonfinite = 3
    with pytest.raises(UserError, match="3 consecutive steps up to step .* non-finite loss or "
                                        "gradient.*the last checkpoint, step .*, holds "
                                        "parameters from before them"):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert records[-1]["train/skipped_steps"] >= 1
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    params = final_params(tmp_path, saved[-1])
    assert all(np.all(np.isfinite(p)) for p in params)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_stop_request_records_the_signal_and_restores_the_handlers(number, capsys):
    before = signal.getsignal(number)
    with preemption.StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), number)
        assert stop.requested() and stop.signal_name == signal.Signals(number).name
        if number == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C stops at once
                os.kill(os.getpid(), number)
    assert signal.getsignal(number) is before
    assert "finishing this step, then saving a checkpoint" in capsys.readouterr().out
