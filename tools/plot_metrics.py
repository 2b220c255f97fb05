"""Plot runs' metrics.jsonl as PNGs: loss, logit scale and bias, learning rate, each evaluator.

    python tools/plot_metrics.py WORKDIR [WORKDIR ...] [--out DIR]

One figure per group, one subplot per metric; several workdirs are drawn on the same
axes, labelled by their directory names, to compare runs. Metrics `eval/<evaluator>/<name>`
are grouped by evaluator (eval_<evaluator>.png), other `eval/...` ones go to eval.png.
Writes to --out (default: the first workdir's plots/) and prints the paths written.
Needs matplotlib, which is in the `test` extra of setup.py (pip install -e ".[test]").
"""

import argparse
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display

from etils import epath  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

TRAIN_GROUPS = {  # file name: whether a metric belongs to it
    "loss": lambda name: name == "train/loss" or name.startswith("train/loss/"),
    "logit_scale_bias": lambda name: name in ("train/logit_scale", "train/logit_bias"),
    "learning_rate": lambda name: name == "train/learning_rate",
}
MARKED_POINTS = 50  # a line of at most this many points marks each (so one evaluation shows)


def group_of(name: str) -> str | None:
    """The figure a metric is drawn in, without ".png"; None for metrics not plotted."""
    parts = name.split("/")
    if parts[0] == "eval":
        return f"eval_{parts[1]}" if len(parts) > 2 else "eval"
    return next((group for group, member in TRAIN_GROUPS.items() if member(name)), None)


def read_series(workdir: epath.Path) -> dict:
    """{metric: ([steps], [values])} of the scalars in WORKDIR/metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        sys.exit(f"plot_metrics: error: {path} does not exist; give the workdir of a run "
                 f"that has logged (python -m bigalign.train ... --workdir {workdir})")
    series = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # cut off by a killed process
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(name, ([], []))
                steps.append(step)
                values.append(value)
    return series


def labels_of(workdirs: list[epath.Path]) -> list[str]:
    """The workdirs' names, or their full paths where two share a name."""
    names = [workdir.name for workdir in workdirs]
    return names if len(set(names)) == len(names) else [str(workdir) for workdir in workdirs]


def plot_group(group: str, metrics: list[str], runs: list[tuple[str, dict]], out: epath.Path):
    """Writes out/<group>.png: a subplot per metric, a line per run that logged it, each
    run in one colour throughout and named once, in the legend below."""
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows + 0.5),
                                squeeze=False, layout="constrained")
    lines = {}  # label: a line of that run, for the legend
    for ax, metric in zip(axes.flat, metrics):
        for index, (label, series) in enumerate(runs):
            if metric in series:
                steps, values = series[metric]
                marker = "o" if len(steps) <= MARKED_POINTS else None
                [lines[label]] = ax.plot(steps, values, color=f"C{index}", marker=marker, markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    figure.suptitle(group)
    labels = [label for label, _ in runs if label in lines]  # in the command line's order
    figure.legend([lines[label] for label in labels], labels, loc="outside lower center",
                  ncols=min(3, len(labels)))
    path = out / f"{group}.png"
    with path.open("wb") as f:
        figure.savefig(f, format="png")
    plt.close(figure)
    return path


def main(argv=None) -> list[epath.Path]:
    """Plots the workdirs' metrics; returns (and prints) the paths of the PNGs written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directories")
    parser.add_argument("--out", help="directory for the PNGs (default: WORKDIR/plots of the first)")
    args = parser.parse_args(argv)
    workdirs = [epath.Path(workdir) for workdir in args.workdirs]
    runs = list(zip(labels_of(workdirs), map(read_series, workdirs)))
    groups = {}
    for _, series in runs:
        for metric in series:
            if (group := group_of(metric)) is not None:
                groups.setdefault(group, []).append(metric)
    if not groups:
        sys.exit(f"plot_metrics: error: no metrics to plot in {', '.join(args.workdirs)} yet; "
                 f"plot again once the run has logged (every log_every steps)")
    out = epath.Path(args.out) if args.out else workdirs[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_group(group, sorted(set(metrics)), runs, out) for group, metrics in groups.items()]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
