"""Hooks: what the training loop does besides training, each with its own `every`.

The loop (`train.run_loop`) knows none of them: after every step it calls each hook
whose `due` says so (by default: every `every` steps and after the last one), and at
the end each hook's `end`. Logging, checkpointing, evaluation, stopping on SIGTERM and
the non-finite guard are hooks; a user adds one from Python without touching the loop:

    class PrintLoss(hooks.Hook):
        every = 10
        def __call__(self, loop):
            print(loop.step, float(loop.metrics["train/loss"]))

    train.train_and_evaluate(config, workdir, hooks=[PrintLoss()])

Hooks run in list order, built-ins first: the guard, logging, the stop request,
checkpointing, evaluation, then the user's.
"""

import dataclasses
from typing import Any

import jax

from bigalign import distributed, evaluators
from bigalign.errors import UserError
from bigalign.metrics import format_table


@dataclasses.dataclass
class LoopState:
    """What the loop shares with its hooks; hooks may read all of it and set `stop`."""

    run: Any  # build.Run
    state: Any  # step.TrainState after `step` updates
    step: int  # updates applied so far
    total_steps: int
    train_data: Any  # the training iterator (checkpointed with the state)
    metrics: dict | None = None  # the last step's metrics, on the device
    unreadable: int = 0  # unreadable examples dropped since the last log line
    stop: bool = False  # set by a hook: end after this step, with a checkpoint of it
    results: dict = dataclasses.field(default_factory=dict)  # the final evaluation

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


class Hook:
    """Base class: `every` steps (0: never during training), and after the last step."""

    every: int = 1

    def due(self, loop: LoopState) -> bool:
        return (bool(self.every) and loop.step % self.every == 0) or loop.step == loop.total_steps

    def __call__(self, loop: LoopState) -> None:
        """Runs after a step for which `due` is true."""

    def end(self, loop: LoopState) -> None:
        """Runs once after the loop, whether it finished or was stopped (not after errors)."""


class NonFiniteGuard(Hook):
    """Raises UserError once `limit` steps in a row were skipped as non-finite.

    It reads each step's metrics one step late, so the next step is queued on the
    device before the host waits for the values.
    """

    def __init__(self, limit: int, checkpointer):
        self.limit, self.checkpointer = limit, checkpointer
        self._previous = None  # (step, metrics)

    def __call__(self, loop):
        if self._previous is not None:
            self._check(*self._previous)
        self._previous = (loop.step, loop.metrics)

    def end(self, loop):
        if self._previous is not None and not loop.stop:
            self._check(*self._previous)

    def _check(self, step: int, metrics: dict) -> None:
        streak = int(metrics["train/nonfinite_streak"])
        if streak >= self.limit:
            last = self.checkpointer.latest_step()
            kept = (f"the last checkpoint, step {last}, holds parameters from before them"
                    if last else "no checkpoint was written")
            raise UserError(
                f"{streak} consecutive steps up to step {step} had a non-finite loss or gradient "
                f"(NaN/Inf) and were skipped, reaching max_consecutive_nonfinite; stopped ({kept}): "
                f"lower optimizer.learning_rate or check the data, then rerun"
            )


class LogMetrics(Hook):
    """Appends the step's metrics to metrics.jsonl and prints the progress line (process 0),
    with the unreadable examples all processes skipped since the last line."""

    def __init__(self, logger, every: int):
        self.logger, self.every = logger, every

    def __call__(self, loop):
        skipped = distributed.total(loop.unreadable)
        if self.logger.active:  # process 0: the others skip the wait for the values
            self.logger.log_train(loop.step, {**jax.device_get(loop.metrics), "data/skipped": skipped})
        loop.unreadable = 0


class StopOnSignal(Hook):
    """Ends the loop after the step in which SIGTERM or SIGINT arrived (preemption.StopRequest).

    With several processes, every `every` steps: all agree whether any got a signal
    (a host-blocking collective, so not on every step), and all stop at that step.
    """

    def __init__(self, stop_request, every: int):
        self.stop_request = stop_request
        self.every = every if jax.process_count() > 1 else 1

    def __call__(self, loop):
        loop.stop = loop.stop or distributed.total(int(self.stop_request.requested())) > 0


class SaveCheckpoints(Hook):
    """Saves the state and the data position every `every` steps, at the end, and on a stop
    (also when a hook after this one asked for it).

    Skipped steps leave the parameters as they were, so saving during a non-finite streak
    is safe.
    """

    def __init__(self, checkpointer, every: int):
        self.checkpointer, self.every = checkpointer, every
        self._saved_step = None

    def due(self, loop):
        return super().due(loop) or loop.stop

    def __call__(self, loop):
        self.checkpointer.save(loop.step, loop.state, loop.train_data)
        self._saved_step = loop.step

    def end(self, loop):
        if loop.stop and self._saved_step != loop.step:
            self(loop)
        self.checkpointer.wait()


class Evaluate(Hook):
    """Runs each `config.evals` entry every its `every` steps, and all of them when
    training is complete; results go to metrics.jsonl and the console, the final ones
    to `loop.results`. Held-out sets are streamed from their sources at each evaluation."""

    def __init__(self, logger, evals):
        self.logger = logger
        self.periods = {name: entry.every for name, entry in evals.items()}

    def _due_names(self, step: int) -> list[str]:
        return [name for name, every in self.periods.items() if every and step % every == 0]

    def due(self, loop):
        return not loop.finished and bool(self._due_names(loop.step))

    def _evaluate(self, loop, names=None) -> tuple[dict, evaluators.Context]:
        context = evaluators.Context(loop.run, loop.state.params)
        results = context.evaluate(names)
        self.logger.write(loop.step, results)
        return results, context

    def __call__(self, loop):
        results, _ = self._evaluate(loop, self._due_names(loop.step))
        if results:
            distributed.say(f"Evaluation at step {loop.step}:\n{format_table(results)}")

    def end(self, loop):
        if loop.stop:
            return
        loop.results, context = self._evaluate(loop)
        distributed.say(f"\nEvaluation at step {loop.step} on {context.describe()}")
        if loop.results:
            distributed.say(format_table(loop.results))
