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


def train_and_evaluate(config, workdir: str, *, hooks=()) -> dict:
    """Trains to `config.total_steps` (resuming from WORKDIR if it holds a checkpoint), then evaluates.

    `hooks`: more `hooks.Hook`s, called after the built-in ones. Returns the final
    evaluation metrics {"eval/...": float}, or {} when a SIGTERM or SIGINT stopped
    training (after checkpointing the step it was on).
    """
    os.makedirs(workdir, exist_ok=True)
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


def main(argv):
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save info lines off the console
    if flags.FLAGS.config is None:
        sys.exit("bigalign: --config is required, e.g. --config configs/demo.py")
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except UserError as error:
        sys.exit(f"bigalign: error: {error}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer and metrics.jsonl.")
    flags.mark_flags_as_required(["workdir"])


def _parse_flags(argv):
    """absl flag parsing, with bad `--config.key=value` overrides as one-line errors."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"bigalign: error: {error} (see --helpfull)")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # ml_collections nests a KeyError's repr in the message: unescape it onto one line.
        message = str(error).replace("\\'", "'").replace("\\n", " ")
        if message[:1] in "'\"" and message[:1] == message[-1:]:
            message = message[1:-1]
        sys.exit(f"bigalign: error in a --config override: {message}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)
