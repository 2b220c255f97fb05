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
from bigalign import config as config_lib, evaluate, train
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
from bigalign import evaluate
model = bigalign.load(sys.argv[1])
pairs = model.run.eval_data()["pairs"]["inputs"]
captions = model.tokenizer.decode(pairs["text"])
assert (model.tokenizer.encode(captions, model.config.text.max_len) == pairs["text"]).all()
np.savez(sys.argv[2], image=model.embed_image(pairs["image"]), text=model.embed_text(captions),
         tokens=pairs["text"], step=model.step)
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
    # The trainer's metrics, recomputed from these embeddings, agree to the last bit.
    _, groups = np.unique(saved["tokens"], axis=0, return_inverse=True)
    groups = groups.reshape(-1)
    similarity = image @ text.T
    for k in config.eval.recall_at:
        assert results[f"eval/image2text_recall@{k}"] == evaluate.recall_at_k(similarity, groups, groups, k)
        assert results[f"eval/text2image_recall@{k}"] == evaluate.recall_at_k(similarity.T, groups, groups, k)
    assert results["eval/image_text_gap"] == evaluate.modality_gap(image, text)


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
    train.train_and_evaluate(changed, str(copy))
    out = capsys.readouterr().out
    assert "Config changed since the run started: log_every: 5 -> 2; total_steps: 20 -> 22" in out
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
