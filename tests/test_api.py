"""Using a trained run: the config saved with it, resuming against it, and bigalign.load."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bigalign
from bigalign import config as config_lib, evaluate, evaluators, train
from bigalign.errors import UserError
from helpers import random_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir, final evaluation) of a tiny run of 20 steps."""
    from conftest import make_tiny_config

    config = make_tiny_config()
    workdir = tmp_path_factory.mktemp("trained")
    results = train.train_and_evaluate(config, str(workdir))
    return config, workdir, results


LOAD_AND_EMBED = """
import sys, numpy as np, bigalign
from bigalign.data import sources
model = bigalign.load(sys.argv[1])
data = model.config.data
source = sources.open_source(data, "shapes", data.eval_split)
examples = [source[i] for i in range(data.num_eval)]
captions = [example["caption"] for example in examples]
np.savez(sys.argv[2], image=model.embed_image(np.stack([e["image"] for e in examples])),
         text=model.embed_text(captions), step=model.step)
"""


def test_a_loaded_model_embeds_exactly_as_the_trainers_evaluation(trained, tmp_path):
    config, workdir, results = trained
    out = tmp_path / "embeddings.npz"
    subprocess.run([sys.executable, "-c", LOAD_AND_EMBED, str(workdir), str(out)], check=True,
                   cwd=REPO, timeout=300)  # a fresh process: only the workdir is shared
    saved = np.load(out)
    assert int(saved["step"]) == config.total_steps
    image, text = saved["image"], saved["text"]
    assert image.shape == text.shape == (config.data.num_eval, config.model.embed_dim)
    # The evaluation's own held-out embeddings, to the last bit.
    model = bigalign.load(str(workdir))
    pairs = evaluators.Context(model.run, model.params).pairs()
    np.testing.assert_array_equal(pairs.embeddings["image"], image)
    np.testing.assert_array_equal(pairs.embeddings["text"], text)
    gap = np.linalg.norm(image.astype(np.float64).mean(0) - text.astype(np.float64).mean(0))
    assert results["eval/geometry/image_text_gap"] == pytest.approx(gap, rel=1e-6)


def test_the_run_saves_its_config_and_loads_it_back(trained):
    config, workdir, _ = trained
    saved = config_lib.load_saved(str(workdir))
    assert json.loads(saved.to_json()) == json.loads(config.to_json())
    assert saved.loss.pairs == (("image", "text"),) and isinstance(saved.data.crop_scale, tuple)
    config_lib.validate(saved)


def test_resuming_with_another_model_width_is_a_one_line_error(trained, tmp_path):
    config, workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    changed = config_lib.load_saved(str(copy))
    changed.model.image.width = 48
    with pytest.raises(UserError) as error:
        train.train_and_evaluate(changed, str(copy))
    message = str(error.value)
    assert "model.image.width is 32 in the run in" in message and "but 48 now" in message
    assert "\n" not in message


def test_resuming_with_harmless_changes_says_what_changed(trained, tmp_path, capsys):
    config, workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    changed = config_lib.load_saved(str(copy))
    changed.log_every, changed.total_steps = 2, 22  # two more steps
    changed.model.image.patch_dropout = 0.25  # FLIP: masked, then (here: the other way) not
    train.train_and_evaluate(changed, str(copy))
    out = capsys.readouterr().out
    assert ("Config changed since the run started: log_every: 5 -> 2; model.image.patch_dropout: "
            "0.0 -> 0.25; total_steps: 20 -> 22") in out
    assert bigalign.load(str(copy)).step == 22 and config_lib.load_saved(str(copy)).total_steps == 22


def test_load_picks_a_step_and_preprocesses_pictures(trained):
    config, workdir, _ = trained
    model = bigalign.load(str(workdir), step=10)
    assert model.step == 10
    with pytest.raises(UserError, match=r"has no checkpoint of step 7; it has steps \[10, 20\]"):
        bigalign.load(str(workdir), step=7)
    rng = np.random.default_rng(random_seed())
    picture = Image.fromarray(rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8))
    pixels = model.preprocess(picture)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    one = model.embed_image(pixels[None])
    scaled = model.embed_image(pixels[None].astype(np.float32) / 127.5 - 1)  # floats in [-1, 1]
    np.testing.assert_allclose(one, scaled, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one, axis=-1), 1, rtol=1e-5)
    texts = model.embed_text(["a red circle", "a blue square"])
    assert model.similarity(one, texts).shape == (1, 2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.embed_image(np.full((2, 16, 16, 3), 200.0)),
         "float images must be scaled to [-1, 1], these span [200, 200]; pass 0..255 pixels as uint8"),
        (lambda m: m.embed_image(np.zeros((16, 16, 3), np.uint8)), "images must be [N, H, W, 3]"),
        (lambda m: m.embed_image(np.zeros((1, 32, 32, 3), np.uint8)),
         "images must be 16x16 for this model; got (32, 32): resize and centre-crop them"),
        (lambda m: m.embed_text([]), "no texts to embed"),
        (lambda m: m.embed_text("a red circle"), "got one string: wrap it in [...]"),
        (lambda m: m.embed_audio(np.zeros((1, 100))), "this model has no 'audio' tower"),
    ],
)
def test_wrong_inputs_are_one_line_errors(trained, call, message):
    _, workdir, _ = trained
    model = bigalign.load(str(workdir))
    with pytest.raises(UserError) as error:
        call(model)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_loading_a_directory_without_a_run_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="holds no config.json: not a bigalign run"):
        bigalign.load(str(tmp_path))


def test_evaluating_a_saved_run_gives_the_trainers_final_numbers(trained, tmp_path):
    config, workdir, results = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    step, evaluated = evaluate.evaluate_run(str(copy))
    assert step == config.total_steps and evaluated == results
    last = json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"step": step, **results}
    # The command line, with an override of the saved config and an earlier checkpoint.
    out = subprocess.run(
        [sys.executable, "-m", "bigalign.evaluate", "--workdir", str(copy), "--step", "10",
         "--config.evals.linear_probe.shots=(2,)"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Evaluation of {copy} at step 10" in out.stdout
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["step"] == 10 and "eval/linear_probe/image_2shot_top1" in record
    assert "eval/linear_probe/image_1shot_top1" not in record
    assert f"{record['eval/zeroshot/image_top1']:.4f}" in out.stdout
    assert json.loads(lines[-2]) == last  # appended: nothing removed


@pytest.mark.parametrize("arguments, message", [
    ([], "--workdir is required"),
    (["--workdir", "{empty}"], "holds no config.json: not a bigalign run"),
    (["--workdir", "{run}", "--step", "7"], "step 7"),
    (["--workdir", "{run}", "--config.model.embed_dim=8"], "model.embed_dim is 16 in the run"),
])
def test_evaluate_command_errors_are_one_line(trained, tmp_path, monkeypatch, arguments, message):
    _, workdir, _ = trained
    (tmp_path / "empty").mkdir()
    argv = ["evaluate"] + [a.format(empty=tmp_path / "empty", run=workdir) for a in arguments]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides from sys.argv
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main()
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


@pytest.mark.parametrize("asks", ["--help", "-h", "--helpfull"])
def test_evaluate_help_prints_usage_and_flags(capsys, monkeypatch, asks):
    """The error lines point to --helpfull, so it, and --help, must answer (with no run)."""
    monkeypatch.setattr(sys, "argv", ["evaluate", asks])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Evaluating a saved run") and "--workdir" in out and "--step" in out
