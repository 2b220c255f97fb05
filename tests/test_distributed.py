"""Training on several JAX processes: real processes on localhost, CPU collectives (gloo).

Two processes of 4 simulated CPU devices each, launched through the CLI, must train like
one process of 8 devices (the reference runs in this pytest process, whose conftest
gives it 8): same losses and periodic evaluation, only process 0 writing; a SIGTERM to
one of them stops both at the same step with a checkpoint, which a one-process run
resumes with the losses of an uninterrupted run. A killed process, or an error on one
of them, ends the whole job within the heartbeat timeout.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bigalign import distributed, train
from bigalign.errors import UserError
from conftest import TEST_XLA_FLAGS
from helpers import write_image_folder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import demo  # noqa: E402  (configs/demo.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough that two processes compiling on a loaded 2-core machine keep their
# heartbeats (5 s was missed there once), short enough to keep the kill tests quick.
HEARTBEAT_SECONDS = 15
# The demo config, short: 24 steps with a progress line each, a stop check every 4 steps
# and an evaluation at step 8 on 200 held-out pairs.
OVERRIDES = {"total_steps": 24, "log_every": 1, "checkpoint_every": 100, "stop_check_every": 4,
             "optimizer.warmup_steps": 3, "data.num_eval": 200, "eval.batch_size": 100,
             "evals.zeroshot.every": 8, "evals.retrieval.every": 8, "evals.geometry.every": 8,
             "evals.linear_probe.every": 8, "evals.linear_probe.num_train": 400}
PROGRESS = re.compile(r"^step +(\d+)/\d+ ", re.MULTILINE)
# Not compared: the demo's softmax loss gives the logit bias a gradient of rounding noise,
# which Adam scales up to full steps, so its value depends on the order of the sums.
NOISE = "eval/geometry/logit_bias"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, flags: list[str], *, processes: int = 2) -> list[subprocess.Popen]:
    """`processes` CLI trainers of one job, each with 4 CPU devices."""
    address = f"localhost:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}",
           "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "bigalign.train", "--config", f"{REPO}/configs/demo.py",
             "--workdir", str(workdir), *flags, f"--coordinator_address={address}",
             f"--num_processes={processes}", f"--process_id={index}",
             f"--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
        )
        for index in range(processes)
    ]


def wait_for_step(processes: list[subprocess.Popen], step: int) -> str:
    """Reads process 0's output until its progress line for `step`; returns what it read.
    If the run ends before, fails with the last output of every process."""
    lines = []
    for line in processes[0].stdout:
        lines.append(line)
        if (progress := PROGRESS.match(line)) and int(progress[1]) >= step:
            return "".join(lines)
    for process in processes[1:]:
        process.kill()
    others = "".join(f"\n--- process {i}:\n{p.communicate()[0][-3000:]}"
                     for i, p in enumerate(processes[1:], start=1))
    raise AssertionError(f"the run ended before step {step}:\n--- process 0:\n"
                         f"{''.join(lines)[-3000:]}{others}")


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def train_losses(workdir) -> dict[int, float]:
    logged = [r for r in records(workdir) if "train/loss" in r]
    assert len({r["step"] for r in logged}) == len(logged), "a step was logged twice"
    return {r["step"]: r["train/loss"] for r in logged}


def eval_records(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in records(workdir) if any(k.startswith("eval/") for k in r)}


def demo_config(**overrides):
    config = demo.get_config()
    for key, value in {**OVERRIDES, **overrides}.items():
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def as_flags(overrides: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in overrides.items()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted one-process, 8-device run of the same config."""
    workdir = tmp_path_factory.mktemp("one_process")
    train.train_and_evaluate(demo_config(), str(workdir))
    return workdir


def test_two_processes_train_like_one_stop_together_and_resume_on_one(tmp_path, reference, capsys):
    workdir = tmp_path / "two_processes"
    processes = launch(workdir, as_flags(OVERRIDES))
    signalled = int(np.random.randint(2))  # a stop signal reaching one host only
    head = wait_for_step(processes, 10)
    processes[signalled].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    outputs[0] = head + outputs[0]
    assert [p.returncode for p in processes] == [0, 0], outputs[signalled][-3000:]
    stopped = re.search(r"Stopped by (.+) after step (\d+)", outputs[0])
    assert stopped, outputs[0][-3000:]
    step = int(stopped[2])
    print(f"SIGTERM to process {signalled}; both stopped after step {step}")
    assert step % OVERRIDES["stop_check_every"] == 0 and 10 <= step < 24
    assert (workdir / "checkpoints" / str(step)).is_dir()

    # The same losses and periodic evaluation as one process; only process 0 wrote.
    expected = train_losses(reference)
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, step + 1))
    np.testing.assert_allclose([losses[s] for s in losses], [expected[s] for s in losses], rtol=1e-5)
    evaluated, expected_eval = eval_records(workdir)[8], eval_records(reference)[8]
    assert sorted(evaluated) == sorted(expected_eval)
    for key in evaluated:
        if key.startswith("eval/") and key != NOISE:
            np.testing.assert_allclose(evaluated[key], expected_eval[key], rtol=1e-5, err_msg=key)
    assert PROGRESS.search(outputs[0]) and not PROGRESS.search(outputs[1])
    assert "Evaluation at step 8" in outputs[0] and "Evaluation" not in outputs[1]

    # One process resumes the two processes' checkpoint: the data starts at the step's
    # batch of the global order, so the losses are those of the uninterrupted run.
    capsys.readouterr()
    results = train.train_and_evaluate(demo_config(), str(workdir))
    printed = capsys.readouterr().out
    assert f"saved by 2 processes, this run has 1: the data restarts at step {step}'s batch" in printed
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, 25))
    np.testing.assert_allclose([losses[s] for s in range(step + 1, 25)],
                               [expected[s] for s in range(step + 1, 25)], rtol=1e-5)
    final = {k: v for k, v in records(reference)[-1].items() if k.startswith("eval/") and k != NOISE}
    assert sorted(results) == sorted([*final, NOISE])
    np.testing.assert_allclose([results[k] for k in final], list(final.values()), rtol=1e-5)


@pytest.mark.parametrize("victim", [0, 1])  # the coordinator (seen at once), another (heartbeats)
def test_killing_one_process_ends_the_other_within_the_heartbeat_timeout(tmp_path, victim):
    processes = launch(tmp_path / "run", as_flags({**OVERRIDES, "total_steps": 1000}))
    survivor = processes[1 - victim]
    wait_for_step(processes, 3)
    processes[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    output = survivor.communicate(timeout=HEARTBEAT_SECONDS + 120)[0]
    waited = time.monotonic() - killed_at
    print(f"killed process {victim}; the other exited {survivor.returncode} after {waited:.1f} s")
    assert processes[victim].wait(timeout=10) == -signal.SIGKILL
    assert survivor.returncode != 0, output[-3000:]
    assert waited < HEARTBEAT_SECONDS + 30, output[-3000:]
    assert "the JAX distributed service detected fatal errors" in output, output[-3000:]


def test_an_error_on_one_process_ends_the_job_and_is_printed_once(tmp_path):
    """One unreadable image, data.max_skipped_fraction=0: the process that reads it fails
    with the one-line error, and the other ends within the heartbeat timeout."""
    rng = np.random.default_rng(np.random.randint(2**31))
    count = 48
    index = write_image_folder(tmp_path / "data", count, rng, truncated=(int(rng.integers(count)),))
    flags = as_flags({**OVERRIDES, "total_steps": 1000, "batch_size": 16, "evals.zeroshot.every": 0,
                      "evals.retrieval.every": 0, "evals.geometry.every": 0, "evals.linear_probe.every": 0,
                      "data.max_skipped_fraction": 0.0})
    started = time.monotonic()
    processes = launch(tmp_path / "run", [*flags, f"--config.data.name=csv:{index}"])
    outputs = [p.communicate(timeout=HEARTBEAT_SECONDS + 240)[0] for p in processes]
    elapsed = time.monotonic() - started
    codes = [p.returncode for p in processes]
    print(f"exit codes {codes} after {elapsed:.1f} s")
    failed = [i for i, out in enumerate(outputs) if "bigalign: error on process" in out]
    assert len(failed) == 1, outputs
    message = [line for line in outputs[failed[0]].splitlines() if "bigalign: error" in line]
    assert len(message) == 1 and "were unreadable, more than data.max_skipped_fraction=0.0" in message[0]
    assert f"bigalign: error on process {failed[0]} of 2:" in message[0]
    assert "were unreadable" not in outputs[1 - failed[0]]
    assert codes[failed[0]] == 1 and codes[1 - failed[0]] != 0, outputs


@pytest.mark.parametrize("arguments, message", [
    (dict(num_processes=2, process_id=0), "need --coordinator_address=HOST:PORT"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2),
     r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (dict(coordinator_address="localhost:1", num_processes=0), "--num_processes=0 must be at least 1"),
])
def test_bad_process_arguments_are_one_line_errors(arguments, message):
    with pytest.raises(UserError, match=message):
        distributed.initialize(**arguments)


def test_process_arguments_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(UserError, match=r"--num_processes='two' must be an integer"):
        distributed.initialize(coordinator_address="localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    distributed.initialize()  # one process: nothing to connect
