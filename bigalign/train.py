"""Training: the loop and the command line.

Command line:
    python -m bigalign.train --config configs/demo.py --workdir /tmp/run [--config.key=value ...]
On several hosts, the same command on each (see distributed.py; on TPU VMs, SLURM and
Open MPI the processes find each other without flags):
    python -m bigalign.train ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
Python (e.g. Colab):
    from bigalign import config as bconfig, train
    results = train.train_and_evaluate(bconfig.base_config(), "/tmp/run")

`bigalign.build` (builder.py) makes the run (model, optimizer, compiled step, data); the loop
steps it and calls the hooks (`hooks.py`): logging, checkpointing, evaluation,
stopping on SIGTERM, the non-finite guard, and any a caller adds. Reusing a workdir
resumes from its latest checkpoint, data position included, after checking the
config against the one saved in the workdir.
"""

if __name__ == "__main__":  # first, so that a restart comes before jax loads
    from bigalign import host_memory

    host_memory.use_huge_pages()

import os
import re
import sys
import traceback

import jax

from bigalign import checkpoint, distributed, flops, hooks as hooks_lib, preemption
from bigalign import config as config_lib, workdir as workdir_lib
from bigalign.builder import build
from bigalign.data.skipping import SKIPPED
from bigalign.errors import UserError
from bigalign.metrics import MetricLogger


def run_loop(loop: hooks_lib.LoopState, hooks) -> None:
    """Steps until `loop.total_steps` or until a hook sets `loop.stop`, calling the hooks."""
    while not loop.finished and not loop.stop:
        host_batch = next(loop.train_data)
        loop.unreadable += host_batch.pop(SKIPPED)
        loop.state, loop.metrics = loop.run.train_step(loop.state, loop.run.global_batch(host_batch))
        loop.step += 1
        for hook in hooks:
            if hook.due(loop):
                hook(loop)
    for hook in hooks:
        hook.end(loop)


def _start_or_resume(config, workdir: str, checkpointer) -> int | None:
    """The step to resume from (None: a new run; 0: a run whose step 0 is its starting
    parameters, as an imported model's); checks and saves the config in the workdir."""
    start_step = checkpointer.latest_step()
    saved = config_lib.load_saved(workdir) if start_step is not None else None
    if saved is not None:
        defining = config_lib.PARAMETER_DEFINING if start_step == 0 else config_lib.RUN_DEFINING
        changes = config_lib.check_resume(saved, config, workdir, defining)
        if changes:
            distributed.say(f"Config changed since the run started: {'; '.join(changes)}")
    if distributed.is_writer():
        config_lib.save(config, workdir)
    return start_step


def _restore(run, checkpointer, step: int, state, train_data):
    """(state, data iterator) of checkpoint `step`; when its data position was saved by
    another number of processes, a new iterator from that step's batch of the global order."""
    state, data_restored = checkpointer.restore(step, state, train_data)
    if not data_restored:
        saved_by = checkpointer.data_processes(step)
        train_data.close()
        train_data = iter(run.train_data(start_batch=step))
        distributed.say(
            f"The data position of this checkpoint was saved by {saved_by or 'no'} processes, "
            f"this run has {jax.process_count()}: the data restarts at step {step}'s batch of "
            f"the global order (the same examples unless some were skipped as unreadable)")
    return state, train_data


def train_and_evaluate(config, workdir: str, *, hooks=()) -> dict:
    """Trains to `config.total_steps` (resuming from WORKDIR if it holds a checkpoint), then evaluates.

    `hooks`: more `hooks.Hook`s, called after the built-in ones. Returns the final
    evaluation metrics {"eval/...": float}, or {} when a SIGTERM or SIGINT stopped
    training (after checkpointing the step it was on).
    """
    workdir_lib.make(workdir)
    run = build(config, workdir)  # validates the config first
    checkpointer = checkpoint.Checkpointer(
        workdir_lib.path(workdir) / "checkpoints", max_to_keep=config.keep_checkpoints
    )
    train_data = logger = None
    try:
        start_step = _start_or_resume(config, workdir, checkpointer)
        state = run.init_state()
        train_data = iter(run.train_data())
        if start_step:  # 0 is a starting point, not a run to resume
            state, train_data = _restore(run, checkpointer, start_step, state, train_data)
            done = " (training is complete: evaluating only)" if start_step >= config.total_steps else ""
            distributed.say(f"Resuming from the checkpoint at step {start_step} in {workdir}{done}")
        else:
            distributed.say(f"Starting a new run in {workdir}")
            state = run.load_initial_params(state, workdir if start_step == 0 else "")
            start_step = 0
        distributed.say(run.describe(state.params))
        logger = MetricLogger(
            workdir, total_steps=config.total_steps, start_step=start_step,
            flops_per_step=run.flops_per_step, num_devices=run.mesh.size,
            peak_flops_per_device=flops.peak_flops_per_device(jax.devices()[0].device_kind),
        )
        loop = hooks_lib.LoopState(run, state, start_step, config.total_steps, train_data)
        with preemption.StopRequest() as stop:
            run_loop(loop, [
                hooks_lib.NonFiniteGuard(config.max_consecutive_nonfinite, checkpointer),
                hooks_lib.LogMetrics(logger, every=config.log_every),
                hooks_lib.StopOnSignal(stop, every=config.stop_check_every),
                hooks_lib.SaveCheckpoints(checkpointer, every=config.checkpoint_every),
                hooks_lib.Evaluate(logger, config.evals),
                *hooks,
            ])
    finally:  # also on errors: no stray prefetch thread or worker processes
        checkpointer.close()
        if train_data is not None:
            train_data.close()
        if logger is not None:
            logger.close()
    if loop.stop:
        reason = stop.signal_name or "a stop request (a signal to another process, or a hook)"
        distributed.say(f"Stopped by {reason} after step {loop.step}, with a checkpoint of it in "
                        f"{workdir}; run the same command again to resume")
    return loop.results


def main(argv, flag_values=None):
    """Trains what the parsed flags say; a UserError ends the process with one line.

    With several processes, any error ends this process at once (distributed.end_job),
    and with it the job: never a hang in a collective.
    """
    from absl import flags, logging

    del argv
    flag_values = flags.FLAGS if flag_values is None else flag_values
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save info lines off the console
    if flag_values.config is None:
        sys.exit("bigalign: --config is required, e.g. --config configs/demo.py")
    try:
        config_lib.validate(flag_values.config)  # before waiting for other processes
        distributed.initialize(
            flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id,
            heartbeat_timeout_seconds=flag_values.heartbeat_timeout_seconds,
        )
        train_and_evaluate(flag_values.config, flag_values.workdir)
    except BaseException as error:  # noqa: BLE001  (re-raised below with one process)
        if jax.distributed.is_initialized() and not isinstance(error, SystemExit):
            distributed.end_job(error)
        if isinstance(error, UserError):
            sys.exit(f"bigalign: error: {error}")
        raise


def define_flags(flag_values=None):
    """--config (a config file, with --config.key=value overrides), --workdir, and how this
    process joins the others of a multi-host job."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                    flag_values=flag_values, lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer and metrics.jsonl "
                        "(local, or gs://... : every host must see the same one).",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["workdir"], flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, the same on every "
                        "process (default: $JAX_COORDINATOR_ADDRESS, else detected on TPU VMs, "
                        "SLURM and Open MPI; none: one process).", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Processes in the job "
                         "(default: $JAX_NUM_PROCESSES, else detected).", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                         "(default: $JAX_PROCESS_ID, else detected).", flag_values=flag_values)
    flags.DEFINE_integer("heartbeat_timeout_seconds", distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
                         "A process silent this long (killed, hung, lost host) ends the whole "
                         "job, every process exiting non-zero.", flag_values=flag_values,
                         lower_bound=1)


def parse_flags(argv, flag_values=None):
    """absl flag parsing; a missing or broken config file and a bad `--config.key=value`
    override end the process with one line."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        sys.exit(f"bigalign: error: config file {path!r} {problem}; give a Python file with a "
                 f"get_config() function, e.g. --config configs/demo.py")
    try:
        return flag_values(argv)
    except flags.Error as error:
        raised = _raised_in_config_file(str(error), path)
        sys.exit(f"bigalign: error: {raised}" if raised else
                 f"bigalign: error: {error} (see --helpfull)")
    except SyntaxError as error:
        sys.exit(f"bigalign: error: config file {error.filename!r} line {error.lineno}: "
                 f"{error.msg}")
    except Exception as error:  # noqa: BLE001  (the config file's own code may raise anything)
        line = _line_in(error, path)
        if line is not None:
            sys.exit(f"bigalign: error: config file {path!r} line {line}: "
                     f"{type(error).__name__}: {error}")
        if "get_config" in str(error):
            sys.exit(f"bigalign: error: config file {path!r} has no get_config() function")
        if not isinstance(error, (AttributeError, KeyError, TypeError, ValueError)):
            raise
        # ml_collections nests a KeyError's repr in the message: unescape it onto one line.
        message = str(error).replace("\\'", "'").replace("\\n", " ")
        while len(message) > 1 and message[:1] in "'\"" and message[:1] == message[-1:]:
            message = message[1:-1]
        if message.isidentifier():  # a bare KeyError: a key the config does not have
            message = f"the config has no key {message!r} (valid keys: bigalign/config.py)"
        sys.exit(f"bigalign: error in a --config override: {message}")


HELP_ARGS = ("-h", "--help", "--helpfull", "-?")


def asks_for_help(argv) -> bool:
    return any(arg in HELP_ARGS for arg in argv[1:])


def exit_with_help(flag_values, usage: str) -> None:
    """Prints `usage` and the flags of `flag_values`, and exits: for commands that parse
    their own FlagValues (bigalign.plan, bigalign.evaluate) where `asks_for_help`; the
    trainer's absl app answers --help and --helpfull itself."""
    print(f"{usage.strip()}\n\nflags:\n{flag_values.get_help()}")
    sys.exit(0)


def flag_value(argv, name: str) -> str | None:
    """The value of `--name=VALUE` or `--name VALUE` in argv, before flags are parsed; or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_path(argv) -> str | None:
    """The file of `--config FILE[:ARGS]` in argv, or None."""
    value = flag_value(argv, "config")
    return None if value is None else value.split(":", 1)[0]


def _raised_in_config_file(message: str, path: str | None) -> str:
    """A ValueError (UserError among them) that the config file's get_config raised, as
    "config file PATH line N: Type: message"; "" for any other flag error. ml_collections
    puts the traceback into the flag error's message, with the error on its last line."""
    if "Error whilst parsing config file" not in message or not path:
        return ""
    lines = [line for file, line in re.findall(r'File "([^"]+)", line (\d+)', message)
             if os.path.abspath(file) == os.path.abspath(path)]
    kind, _, text = message.strip().splitlines()[-1].partition(": ")
    where = f"config file {path!r}" + (f" line {lines[-1]}" if lines else "")
    return f"{where}: {kind.rsplit('.', 1)[-1]}: {text}"


def _line_in(error: BaseException, path: str | None) -> int | None:
    """The line of `path` (the config file) deepest in the error's traceback, if any."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if path and os.path.abspath(frame.filename) == os.path.abspath(path)]
    return lines[-1] if lines else None


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)
