"""Run logging: a progress line on stdout and one JSON object per line in WORKDIR/metrics.jsonl."""

import datetime
import json
import os
import time

import numpy as np


def _as_number(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricLogger:
    """Writes `{"step": s, "train/loss": ..., ...}` lines and prints progress with steps/s and ETA."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self._last_time = time.perf_counter()
        self._last_step = start_step

    def write(self, step: int, metrics: dict) -> dict:
        record = {"step": int(step), **{k: _as_number(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def log_train(self, step: int, metrics: dict) -> None:
        """Appends the metrics and prints `step  loss  scale  steps/s  ETA`."""
        now = time.perf_counter()
        steps_per_second = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        record = self.write(step, {**metrics, "train/steps_per_second": steps_per_second})
        eta = datetime.timedelta(seconds=round((self.total_steps - step) / steps_per_second))
        print(
            f"step {step:>6}/{self.total_steps}  loss {record['train/loss']:.4f}  "
            f"scale {record['train/logit_scale']:.2f}  {steps_per_second:.2f} steps/s  ETA {eta}",
            flush=True,
        )


def format_table(metrics: dict) -> str:
    """A two-column text table of metric name and value."""
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)
