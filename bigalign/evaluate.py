"""Evaluating a saved run: its `config.evals` on one of its checkpoints.

    python -m bigalign.evaluate --workdir /tmp/run [--step S] [--config.evals.zeroshot.data=...]

The config is the run's own (WORKDIR/config.json), with any `--config.key=value`
overrides (usually `evals.*`); the checkpoint is the latest, or `--step`. It prints the
metrics and appends them to WORKDIR/metrics.jsonl (and TensorBoard) at that step, as
the trainer's evaluation would have. Python: `evaluate_run(workdir, step, overrides)`.
"""

if __name__ == "__main__":  # first, so that a restart comes before jax loads
    from bigalign import host_memory

    host_memory.use_huge_pages()

import sys

from bigalign import api, config as config_lib, distributed, evaluators, train
from bigalign import workdir as workdir_lib
from bigalign.errors import UserError
from bigalign.metrics import MetricLogger, format_table


def evaluate_run(workdir: str, step: int | None = None, config=None) -> tuple[int, dict]:
    """(step, {"eval/...": float}) of `workdir`'s checkpoint `step` (default: the latest),
    evaluated with `config` (default: the run's saved config); logged to its metrics."""
    model = api.load(workdir, step, config=config)
    context = evaluators.Context(model.run, model.params)
    results = context.evaluate()
    logger = MetricLogger(workdir, total_steps=model.config.total_steps, keep_later=True)
    try:
        logger.write(model.step, results)
    finally:
        logger.close()
    distributed.say(f"Evaluation of {workdir} at step {model.step} on {context.describe()}")
    if results:
        distributed.say(format_table(results))
    return model.step, results


def command_flags(saved):
    """The command's flags, with the run's saved config as `--config`'s default."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", saved, "The run's config, with overrides.",
                                    flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "The run to evaluate.", flag_values=flag_values)
    flags.DEFINE_integer("step", None, "The checkpoint (default: the latest).",
                         flag_values=flag_values)
    return flag_values


def main(argv=None) -> None:
    """The command line: the saved config becomes the `--config` flag's default, so
    `--config.key=value` overrides it."""
    from absl import flags
    from ml_collections import ConfigDict

    argv = sys.argv if argv is None else argv
    if train.asks_for_help(argv):  # before the run's config, which it needs none of
        train.exit_with_help(command_flags(ConfigDict()), __doc__)
    workdir = train.flag_value(argv[1:], "workdir")
    if workdir is None:
        sys.exit("bigalign: error: --workdir is required: the run to evaluate")
    try:
        saved = config_lib.load_saved(workdir)
    except UserError as error:
        sys.exit(f"bigalign: error: {error}")
    if saved is None:
        sys.exit(f"bigalign: error: {workdir_lib.path(workdir)} holds no {config_lib.SAVED_CONFIG}: "
                 f"not a bigalign run; give the --workdir a training run wrote")
    flag_values = command_flags(saved)
    try:
        flag_values(argv)
    except flags.Error as error:
        sys.exit(f"bigalign: error: {error} (see --helpfull)")
    try:
        evaluate_run(workdir, flag_values.step, flag_values.config)
    except UserError as error:
        sys.exit(f"bigalign: error: {error}")


if __name__ == "__main__":
    main()
