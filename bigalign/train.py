"""Training: the loop and the command line.

Command line:
    python -m bigalign.train --config configs/demo.py --workdir /tmp/run [--config.key=value ...]
Python (e.g. Colab):
    from bigalign import config as bconfig, train
    results = train.train_and_evaluate(bconfig.base_config(), "/tmp/run")

`bigalign.build` (builder.py) makes the run (model, optimizer, compiled step, data); the loop
steps it and calls the hooks (`hooks.py`): logging, checkpointing, evaluation,
stopping on SIGTERM, the non-finite guard, and any a caller adds. Reusing a workdir
resumes from its latest checkpoint, data position included, after checking the
config against the one saved in the workdir.
"""

import os
import sys
import traceback

import jax

from bigalign import checkpoint, flops, hooks as hooks_lib, preemption
from bigalign import config as config_lib
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


def _start_or_resume(config, workdir: str, checkpointer) -> int:
    """The step to resume from (0: a new run); checks and saves the config in the workdir."""
    start_step = checkpointer.latest_step() or 0
    saved = config_lib.load_saved(workdir) if start_step else None
    if saved is not None:
        changes = config_lib.check_resume(saved, config, workdir)
        if changes:
            print(f"Config changed since the run started: {'; '.join(changes)}", flush=True)
    if jax.process_index() == 0:
        config_lib.save(config, workdir)
    return start_step


def _make_workdir(workdir: str) -> None:
    """Creates the workdir; a path that cannot be one is a UserError."""
    if not workdir:
        raise UserError("--workdir is empty; give the directory for the run's checkpoints")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is a file, not a directory; give a directory "
                        f"(a new one starts a run, an existing run's resumes it)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --workdir {workdir!r}: {error.strerror}; give a "
                        f"directory you can write") from None


def train_and_evaluate(config, workdir: str, *, hooks=()) -> dict:
    """Trains to `config.total_steps` (resuming from WORKDIR if it holds a checkpoint), then evaluates.

    `hooks`: more `hooks.Hook`s, called after the built-in ones. Returns the final
    evaluation metrics {"eval/...": float}, or {} when a SIGTERM or SIGINT stopped
    training (after checkpointing the step it was on).
    """
    _make_workdir(workdir)
    run = build(config, workdir)  # validates the config first
    checkpointer = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    train_data = None
    try:
        start_step = _start_or_resume(config, workdir, checkpointer)
        state = run.init_state()
        train_data = iter(run.train_data())
        if start_step:
            state = checkpointer.restore(start_step, state, train_data)
            done = " (training is complete: evaluating only)" if start_step >= config.total_steps else ""
            print(f"Resuming from the checkpoint at step {start_step} in {workdir}{done}", flush=True)
        else:
            print(f"Starting a new run in {workdir}", flush=True)
            state = run.load_initial_towers(state)
        print(run.describe(state.params), flush=True)
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
                hooks_lib.StopOnSignal(stop),
                hooks_lib.SaveCheckpoints(checkpointer, every=config.checkpoint_every),
                hooks_lib.Evaluate(logger, every=config.eval.every),
                *hooks,
            ])
    finally:  # also on errors: no stray prefetch thread or worker processes
        checkpointer.close()
        if train_data is not None:
            train_data.close()
    if loop.stop:
        reason = stop.signal_name or "a stop request (a signal to another process, or a hook)"
        print(f"Stopped by {reason} after step {loop.step}, with a checkpoint of it in {workdir}; "
              f"run the same command again to resume", flush=True)
    return loop.results


def main(argv, flag_values=None):
    """Trains what the parsed flags say; a UserError ends the process with one line."""
    from absl import flags, logging

    del argv
    flag_values = flags.FLAGS if flag_values is None else flag_values
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save info lines off the console
    if flag_values.config is None:
        sys.exit("bigalign: --config is required, e.g. --config configs/demo.py")
    try:
        train_and_evaluate(flag_values.config, flag_values.workdir)
    except UserError as error:
        sys.exit(f"bigalign: error: {error}")


def define_flags(flag_values=None):
    """--config (a config file, with --config.key=value overrides) and --workdir."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                    flag_values=flag_values, lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer and metrics.jsonl.",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["workdir"], flag_values=flag_values)


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
        sys.exit(f"bigalign: error: {error} (see --helpfull)")
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


def _config_path(argv) -> str | None:
    """The file of `--config FILE[:ARGS]` in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _line_in(error: BaseException, path: str | None) -> int | None:
    """The line of `path` (the config file) deepest in the error's traceback, if any."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if path and os.path.abspath(frame.filename) == os.path.abspath(path)]
    return lines[-1] if lines else None


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)
