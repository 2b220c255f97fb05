"""Run logging: a progress line on stdout and one JSON object per line in WORKDIR/metrics.jsonl.

Only process 0 logs (`distributed.is_writer`); on the others the logger is inactive.
"""

import datetime
import json
import time

import numpy as np

from bigalign import distributed, workdir as workdir_lib


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut off by a killed process."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _as_number(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricLogger:
    """Writes `{"step": s, "train/loss": ..., ...}` lines and prints progress with speed and ETA.

    Speed is steps/s and, given the model FLOPs of a step, achieved TFLOP/s per device
    and, where the device's peak is known, model FLOPs utilisation (MFU).
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 flops_per_step: float = 0.0, num_devices: int = 1,
                 peak_flops_per_device: float | None = None):
        self.path = workdir_lib.path(workdir) / "metrics.jsonl"
        self.active = distributed.is_writer()
        self.total_steps = total_steps
        self.flops_per_device_step = flops_per_step / num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self._last_time = time.perf_counter()
        self._last_step = start_step
        # Object stores (gs://...) cannot append: there the file is rewritten whole.
        self._remote = "://" in str(self.path)
        kept = self._records_until(start_step) if self.active else []
        self._lines = kept if self._remote else None  # the whole file, where it is rewritten

    def _records_until(self, step: int) -> list[str]:
        """The log's lines up to `step`, with any later ones removed from the file: a resumed
        run logs those steps again, as they were lost with the run that wrote them after its
        last checkpoint."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if (line_step := _step_of(line)) is not None
                and line_step <= step]
        if len(kept) < len(lines):
            workdir_lib.write_atomically(self.path, "".join(kept))  # never a half-written log
        return kept

    def write(self, step: int, metrics: dict) -> dict:
        """Adds a line to metrics.jsonl (process 0) and returns the record."""
        record = {"step": int(step), **{k: _as_number(v) for k, v in metrics.items()}}
        if not self.active:
            return record
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
            workdir_lib.write_atomically(self.path, "".join(self._lines))
        else:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
        return record

    def log_train(self, step: int, metrics: dict) -> None:
        """Appends the metrics and prints `step  loss  scale  steps/s  TFLOP/s  [MFU]  ETA`."""
        now = time.perf_counter()
        steps_per_second = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        flops_per_second = self.flops_per_device_step * steps_per_second
        speed = {"train/steps_per_second": steps_per_second,
                 "train/tflops_per_second_per_device": flops_per_second / 1e12}
        mfu = ""
        if self.peak_flops_per_device:
            speed["train/mfu"] = flops_per_second / self.peak_flops_per_device
            mfu = f"  MFU {100 * speed['train/mfu']:.1f}%"
        record = self.write(step, {**metrics, **speed})
        eta = datetime.timedelta(seconds=round((self.total_steps - step) / steps_per_second))
        skipped = record.get("data/skipped", 0)
        skipped = f"  {skipped} unreadable examples skipped" if skipped else ""
        if record.get("train/skipped_steps"):
            skipped += f"  {record['train/skipped_steps']} non-finite steps skipped"
        print(
            f"step {step:>6}/{self.total_steps}  loss {record['train/loss']:.4f}  "
            f"scale {record['train/logit_scale']:.2f}  {steps_per_second:.2f} steps/s  "
            f"{flops_per_second / 1e12:.3g} TFLOP/s/device{mfu}  ETA {eta}{skipped}",
            flush=True,
        )


def format_table(metrics: dict) -> str:
    """A two-column text table of metric name and value."""
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned markdown table (readable as plain text): first column left, the rest right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def render(cells):
        padded = [cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([render(header), rule, *map(render, rows)])
