"""The processes of a run: starting JAX on many hosts, one writer, ending the job together.

A run on a TPU pod slice or a GPU cluster is one JAX process per host (or per GPU),
all running the same program (multi-controller JAX):
- `initialize` connects them through `jax.distributed` before anything touches a
  device: from explicit arguments (the CLI's `--coordinator_address`,
  `--num_processes`, `--process_id`, or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), else from the
  cluster's environment as `jax.distributed.initialize()` detects it (TPU VMs,
  SLURM, Open MPI, Kubernetes); on one machine with none of these it does nothing.
- Process 0 is the writer (`is_writer`, `say`): it prints and writes the workdir's
  logs; every process computes, and all take part in checkpoints.
- `end_job` ends a process that failed without JAX's clean shutdown, whose barrier
  would wait for the others while they wait for it in a collective. Its heartbeats
  stop, as a killed process's do: the coordination service sees the task gone and
  ends every other process within `heartbeat_timeout_seconds` (a non-zero exit with
  JAX's reason, "another task died"), so a failure anywhere never hangs the job.
"""

import os
import sys
import traceback

import jax
import numpy as np
from jax.experimental import multihost_utils

from bigalign.errors import UserError

ENVIRONMENT = {  # argument -> environment variable read when the argument is not given
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
# Seconds a silent process is waited for before the whole job ends.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60


def _explicit_arguments(coordinator_address, num_processes, process_id) -> dict:
    """The given arguments, else their environment variables; integers checked."""
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                 process_id=process_id)
    for name, variable in ENVIRONMENT.items():
        if given[name] is None and os.environ.get(variable):
            given[name] = os.environ[variable]
    for name in ("num_processes", "process_id"):
        if given[name] is not None:
            try:
                given[name] = int(given[name])
            except ValueError:
                raise UserError(f"--{name}={given[name]!r} must be an integer") from None
    if given["num_processes"] is not None and given["num_processes"] < 1:
        raise UserError(f"--num_processes={given['num_processes']} must be at least 1")
    count, index = given["num_processes"], given["process_id"]
    if count is not None and index is not None and not 0 <= index < count:
        raise UserError(f"--process_id={index} must be in [0, --num_processes={count})")
    return {name: value for name, value in given.items() if value is not None}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
               initialization_timeout_seconds: int = 300) -> None:
    """Connects this process to the others of its job (see the module docstring).

    Must run before any JAX computation. With explicit arguments missing some, the
    cluster's environment fills the rest; with none and no cluster, a single process
    needs nothing and this returns.
    """
    explicit = _explicit_arguments(coordinator_address, num_processes, process_id)
    if explicit and "coordinator_address" not in explicit and explicit.get("num_processes", 2) > 1:
        raise UserError("--num_processes/--process_id need --coordinator_address=HOST:PORT "
                        "(process 0's host and a free port), the same on every process")
    if explicit.get("num_processes") == 1:
        return  # one process: nothing to connect
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                    initialization_timeout=initialization_timeout_seconds)
    try:
        jax.distributed.initialize(**explicit, **timeouts)
    except ValueError as error:
        if not explicit and "coordinator_address should be defined" in str(error):
            return  # no cluster detected: a single process
        raise UserError(f"jax.distributed.initialize failed: {error}; give "
                        f"--coordinator_address, --num_processes and --process_id") from None
    except RuntimeError as error:
        # JAX is already running in this process: the caller embeds the command line (a
        # test, a notebook), which then runs as one process. The CLI itself calls this first.
        if explicit or "must be called before" not in str(error):
            raise UserError(f"jax.distributed.initialize failed: {error}") from None


def is_writer() -> bool:
    """Whether this process writes logs and prints (process 0)."""
    return jax.process_index() == 0


def say(message: str) -> None:
    """Prints `message` on process 0 only (every process runs the same program)."""
    if is_writer():
        print(message, flush=True)


def barrier(name: str) -> None:
    """Waits until every process got here (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def total(count: int) -> int:
    """The sum of `count` over all processes, on every process (a host-blocking collective
    with several processes)."""
    if jax.process_count() == 1:
        return count
    return int(np.sum(multihost_utils.process_allgather(np.array(count, np.int64))))


def end_job(error: BaseException) -> None:
    """Prints why this process failed, once, and exits 1 at once, skipping JAX's shutdown
    barrier (the others end within the heartbeat timeout; see the module docstring)."""
    where = f"process {jax.process_index()} of {jax.process_count()}"
    if isinstance(error, UserError):
        print(f"bigalign: error on {where}: {error}", file=sys.stderr)
    else:
        traceback.print_exception(error)
        print(f"bigalign: {where} failed ({type(error).__name__}); ending the job",
              file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
