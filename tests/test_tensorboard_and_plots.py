"""The TensorBoard event files MetricLogger writes, and tools/plot_metrics.py."""

import json
import os
import runpy
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c

from bigalign.metrics import MetricLogger
from helpers import random_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT_METRICS = os.path.join(REPO, "tools", "plot_metrics.py")
EVAL_METRICS = ("eval/zeroshot/image_top1", "eval/retrieval/image2text_recall@1",
                "eval/retrieval/text2image_recall@5", "eval/geometry/image_text_gap")


# --- TensorBoard event files ------------------------------------------------------


def test_the_trainer_does_not_import_torch():
    """tensorboardX imports torch when it is installed (as the test extra installs it);
    bigalign's trainer loads tensorboardX's writer without it. A fresh process: this
    one has torch loaded by the open_clip tests."""
    check = "import sys, bigalign.train; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout[-2000:]


def read_events(directory) -> list[Event]:
    """The events of every event file in `directory`, files in name order as TensorBoard
    reads them, each record's TFRecord framing and checksums checked."""
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length, length_crc = struct.unpack_from("<QI", data, offset)
            body = data[offset + 12:offset + 12 + length]
            (body_crc,) = struct.unpack_from("<I", data, offset + 12 + length)
            assert length_crc == masked_crc32c(data[offset:offset + 8]) and body_crc == masked_crc32c(body)
            events.append(Event.FromString(body))
            offset += 16 + length
    return events


def tensorboard_view(events) -> list[tuple[int, dict]]:
    """(step, {tag: value}) of the events' scalars as TensorBoard shows them: a restart mark
    (SessionLog.START) other than the first drops the earlier events of its step and later
    (tensorboard's plugin_event_accumulator)."""
    view, started = [], False
    for event in events:
        if event.session_log.status == SessionLog.START:
            if started:
                view = [(step, values) for step, values in view if step < event.step]
            started = True
        elif event.HasField("summary"):
            view.append((event.step, {value.tag: value.simple_value for value in event.summary.value}))
    return view


def as_float32(records) -> list[tuple[int, dict]]:
    """(step, {name: value}) of the records' scalars, rounded as TensorBoard stores them."""
    return [(record["step"], {name: float(np.float32(value)) for name, value in record.items()
                              if name != "step" and not isinstance(value, list)})
            for record in records]


def random_records(rng, steps) -> list[tuple[int, dict]]:
    """(step, metrics) pairs: train metrics with an int and a list, eval metrics every other step."""
    records = []
    for step in steps:
        records.append((step, {"train/loss": rng.normal(), "train/logit_scale": rng.uniform(1, 100),
                               "data/skipped": int(rng.integers(0, 5)),
                               "train/histogram": rng.normal(size=3)}))
        if step % 2:
            records.append((step, {name: rng.uniform() for name in EVAL_METRICS}))
    return records


def test_every_scalar_is_in_the_event_file_after_each_write(tmp_path):
    rng = np.random.default_rng(random_seed())
    logger = MetricLogger(str(tmp_path), total_steps=100)
    written = []
    for step, metrics in random_records(rng, np.sort(rng.choice(100, size=6, replace=False))):
        written.append(logger.write(step, metrics))
        # Flushed: on disk before the logger is closed, tags exactly the metrics' names.
        assert tensorboard_view(read_events(tmp_path / "tensorboard")) == as_float32(written)
    assert isinstance(written[0]["train/histogram"], list)  # in metrics.jsonl only
    logger.close()
    logger.close()


def test_tensorboard_shows_what_metrics_jsonl_keeps_after_a_resume_and_an_evaluation(tmp_path):
    rng = np.random.default_rng(random_seed())
    resume_step = int(rng.integers(1, 6))
    first = MetricLogger(str(tmp_path), total_steps=9)
    for step, metrics in random_records(rng, range(1, 7)):
        first.write(step, metrics)
    first.close()
    resumed = MetricLogger(str(tmp_path), total_steps=9, start_step=resume_step)
    for step, metrics in random_records(rng, range(resume_step + 1, 10)):
        resumed.write(step, metrics)
    resumed.close()
    evaluation = MetricLogger(str(tmp_path), total_steps=9, keep_later=True)  # bigalign.evaluate's
    evaluation.write(resume_step, {name: rng.uniform() for name in EVAL_METRICS})
    evaluation.close()
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert tensorboard_view(read_events(tmp_path / "tensorboard")) == as_float32(logged)


# --- tools/plot_metrics.py --------------------------------------------------------


def write_run(workdir, rng, *, logit_bias: bool) -> None:
    """A metrics.jsonl of 20 train lines and 3 evaluations, the last line cut off."""
    lines = []
    for step in range(1, 21):
        record = {"step": step, "train/loss": rng.uniform(0, 5), "train/loss/image_text": rng.uniform(0, 5),
                  "train/logit_scale": rng.uniform(1, 100), "train/learning_rate": rng.uniform(0, 1e-3),
                  "train/grad_norm": rng.uniform(), "train/histogram": rng.normal(size=3).tolist()}
        if logit_bias:
            record["train/logit_bias"] = rng.normal()
        lines.append(json.dumps(record))
        if step % 10 == 0 or step == 1:
            lines.append(json.dumps({"step": step, **{name: rng.uniform() for name in EVAL_METRICS}}))
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:17])


def test_plot_metrics_writes_a_png_per_group(tmp_path):
    rng = np.random.default_rng(random_seed())
    write_run(tmp_path / "siglip", rng, logit_bias=True)
    write_run(tmp_path / "clip", rng, logit_bias=False)
    main = runpy.run_path(PLOT_METRICS)["main"]
    expected = {"loss.png", "logit_scale_bias.png", "learning_rate.png",
                "eval_zeroshot.png", "eval_retrieval.png", "eval_geometry.png"}
    runs = [str(tmp_path / "siglip"), str(tmp_path / "clip")]
    cases = [([*runs, "--out", str(tmp_path / "compare")], tmp_path / "compare"),
             (runs, tmp_path / "siglip" / "plots")]  # by default, in the first workdir
    for argv, out in cases:
        written = main(argv)
        assert sorted(map(str, written)) == sorted(str(out / name) for name in expected)
        assert set(os.listdir(out)) == expected
        for path in written:
            with Image.open(str(path)) as image:
                assert image.format == "PNG" and image.width > 0 and image.height > 0


def test_plot_metrics_without_metrics_is_a_one_line_error(tmp_path):
    missing = tmp_path / "not_a_run"
    result = subprocess.run([sys.executable, PLOT_METRICS, str(missing)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("plot_metrics: error: ")
    assert str(missing / "metrics.jsonl") in result.stderr

    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "train/lo')  # killed before a line ended
    with pytest.raises(SystemExit, match=r"^plot_metrics: error: no metrics to plot in [^\n]*$"):
        runpy.run_path(PLOT_METRICS)["main"]([str(tmp_path)])
