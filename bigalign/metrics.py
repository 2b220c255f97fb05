"""Run logging: a progress line on stdout, one JSON object per line in WORKDIR/metrics.jsonl
and the same scalars in TensorBoard event files in WORKDIR/tensorboard.

Only process 0 logs (`distributed.is_writer`); on the others the logger is inactive.
"""

import datetime
import itertools
import json
import os
import sys
import time

import numpy as np
from etils import epath

# tensorboardX's package __init__ imports torch when it is installed (about 2 s per
# process, and bigalign never imports torch); the event writer and protos need none
# of it, so torch is hidden while they load (unless it is already imported).
_hide_torch = "torch" not in sys.modules
if _hide_torch:
    sys.modules["torch"] = None  # `import torch` then raises ImportError, which it handles
try:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.proto.summary_pb2 import Summary
finally:
    if _hide_torch:
        del sys.modules["torch"]

from bigalign import distributed, workdir as workdir_lib  # noqa: E402
from bigalign.errors import UserError  # noqa: E402


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut off by a killed process."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _as_number(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


# Event files are named by time (in seconds), host and, as TensorBoard's own writer does,
# pid and a number: loggers opened within a second do not overwrite each other's files.
_EVENT_FILES = itertools.count()


def _open_events(directory: epath.Path, start_step: int, *, restart: bool) -> EventsWriter:
    """A new TensorBoard event file in `directory`, written synchronously (SummaryWriter hands
    events to a thread, so its flush() can leave the latest unwritten).

    With `restart` it begins with a restart mark (SessionLog.START) at start_step + 1:
    TensorBoard then drops the earlier files' events from that step on, as `MetricLogger`
    drops those lines of metrics.jsonl. A new run writes one too, as TensorBoard takes a
    run's first mark for its start, not a restart.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        events = EventsWriter(str(directory / "events"), f".{os.getpid()}.{next(_EVENT_FILES)}")
    except ImportError as error:  # gs:// needs google-cloud-storage, s3:// boto3
        raise UserError(f"cannot write TensorBoard event files to {directory}: {error}") from None
    if restart:
        events.write_event(Event(step=start_step + 1, session_log=SessionLog(status=SessionLog.START)))
    return events


class MetricLogger:
    """Writes `{"step": s, "train/loss": ..., ...}` lines and their scalars as TensorBoard
    events (tag: the metric's name), and prints progress with speed and ETA.

    Speed is steps/s and, given the model FLOPs of a step, achieved TFLOP/s per device
    and, where the device's peak is known, model FLOPs utilisation (MFU).
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 flops_per_step: float = 0.0, num_devices: int = 1,
                 peak_flops_per_device: float | None = None, keep_later: bool = False):
        self.path = workdir_lib.path(workdir) / "metrics.jsonl"
        self.active = distributed.is_writer()
        self.total_steps = total_steps
        self.flops_per_device_step = flops_per_step / num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self._last_time = time.perf_counter()
        self._last_step = start_step
        # Object stores (gs://...) cannot append: there the file is rewritten whole.
        self._remote = "://" in str(self.path)
        if not self.active:
            kept = []
        elif keep_later:  # adding evaluations to a run's log (bigalign.evaluate): remove nothing
            kept = self._read_lines()
        else:
            kept = self._records_until(start_step)
        self._lines = kept if self._remote else None  # the whole file, where it is rewritten
        self._events = (_open_events(self.path.parent / "tensorboard", start_step, restart=not keep_later)
                        if self.active else None)

    def _read_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return self.path.read_text(encoding="utf-8").splitlines(keepends=True)

    def _records_until(self, step: int) -> list[str]:
        """The log's lines up to `step`, with any later ones removed from the file: a resumed
        run logs those steps again, as they were lost with the run that wrote them after its
        last checkpoint."""
        lines = self._read_lines()
        kept = [line for line in lines if (line_step := _step_of(line)) is not None
                and line_step <= step]
        if len(kept) < len(lines):
            workdir_lib.write_atomically(self.path, "".join(kept))  # never a half-written log
        return kept

    def write(self, step: int, metrics: dict) -> dict:
        """Adds a line to metrics.jsonl and an event of its scalars to the event file, each
        flushed (process 0), and returns the record."""
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
        if self._events is not None:
            self._write_event(record)
        return record

    def _write_event(self, record: dict) -> None:
        """The record's scalars as one event at its step; lists are left to metrics.jsonl."""
        scalars = [Summary.Value(tag=name, simple_value=value) for name, value in record.items()
                   if name != "step" and isinstance(value, (int, float))]
        if scalars:
            self._events.write_event(
                Event(wall_time=time.time(), step=record["step"], summary=Summary(value=scalars)))
            self._events.flush()

    def close(self) -> None:
        """Closes the event file; later calls do nothing."""
        if self._events is not None:
            self._events.close()
            self._events = None

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
