"""notebooks/quickstart.ipynb runs top to bottom (nbclient, CPU) and shows what it claims.

The notebook trains the demo for QUICKSTART_STEPS steps (20 here: one evaluation, at the
end) into a temporary workdir, loads it with bigalign.load and plots a similarity matrix
and the loss curve.
"""

import json
import os
import pathlib
import re
import sys

import nbclient
import nbformat
import numpy as np

from helpers import saved_params

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"
STEPS = 20
CELL_TIMEOUT_S = 300  # generous: the machine may be shared; the whole run takes ~1-2 min

# Appended to the executed copy only: reads the notebook's variables back as one JSON line.
PROBE = """
import json as _json, sys as _sys
print("PROBE " + _json.dumps({
    "executable": _sys.executable,
    "results": {k: float(v) for k, v in results.items()},
    "logit_scale": float(model.logit_scale),
    "step": int(model.step),
    "scores_shape": list(scores.shape),
    "num_train_records": len(train_records),
}))
"""


def _kernel_env(workdir) -> dict:
    """The test process's environment for the kernel, minus the 8 simulated devices."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("MPLBACKEND", None)  # let ipykernel pick matplotlib's inline backend
    env["QUICKSTART_STEPS"] = str(STEPS)
    env["QUICKSTART_WORKDIR"] = str(workdir)
    return env


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert "QUICKSTART_STEPS" in "".join(cell.source for cell in nb.cells)


def test_quickstart_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    num_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    workdir = tmp_path / "run"
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    )
    client.execute(env=_kernel_env(workdir))  # raises CellExecutionError on a failing cell

    code_cells = [cell for cell in nb.cells[:num_cells] if cell.cell_type == "code"]
    for cell in code_cells:
        assert cell.execution_count is not None, cell.source[:80]
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{cell.source[:80]!r}: {errors[0].ename}: {errors[0].evalue}"

    # The similarity cell: a figure, then one best-caption line per image.
    [similarity_cell] = [c for c in code_cells if "model.similarity(" in c.source]
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for o in similarity_cell.outputs), "no similarity figure"
    best = re.findall(r"image (\d+): best caption (\d+) '", _text(similarity_cell))
    assert [int(i) for i, _ in best] == list(range(8))
    assert all(0 <= int(j) < 8 for _, j in best)
    # The loss curve cell draws a figure too.
    [loss_cell] = [c for c in code_cells if "metrics.jsonl" in c.source]
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for o in loss_cell.outputs), "no loss figure"

    [line] = [l for l in _text(nb.cells[-1]).splitlines() if l.startswith("PROBE ")]
    probe = json.loads(line[len("PROBE "):])
    assert os.path.realpath(probe["executable"]) == os.path.realpath(sys.executable)
    results = probe["results"]
    assert {"eval/zeroshot/image_top1", "eval/retrieval/image2text_recall@1",
            "eval/retrieval/text2image_recall@1"} <= set(results), results
    assert probe["step"] == STEPS  # bigalign.load restored the final checkpoint
    # ... and its parameters: the logit scale is exp of the one saved at the last step
    # (the scale logged at that step is the one before the step's update).
    saved_scale = float(np.exp(saved_params(workdir, STEPS)["logit_scale"]))
    assert abs(probe["logit_scale"] - saved_scale) <= 1e-6 * saved_scale
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r for r in logged if "train/logit_scale" in r][-1]["step"] == STEPS
    assert probe["scores_shape"] == [8, 8]
    assert probe["num_train_records"] == len([r for r in logged if "train/loss" in r]) >= 2
    assert (workdir / "config.json").exists()
