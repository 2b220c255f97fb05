"""tools/import_open_clip.py against open_clip itself: a random-weight ViT-S-32 (no
download), saved as safetensors, imported, and embedded by `bigalign.load` equals
open_clip's encode_image / encode_text on the same inputs; LiT from the import keeps
the image tower bit-identical; the importer's refusals are one line each."""

import math
import os
import sys

import jax
import numpy as np
import open_clip
import pytest
import torch
from safetensors.numpy import save_file

import bigalign
from bigalign import config as config_lib, train
from bigalign.errors import UserError
from bigalign.published import open_clip as open_clip_import
from helpers import random_seed, saved_params

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import import_open_clip  # noqa: E402

TRICKY_TEXTS = ["a photo of a cat!", "Hello, world!! It's 3:45 p.m. — naïve café 東京 🐈",
                "&amp; <b>bold</b>   spaced\tout", "", " ".join(["long"] * 100)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(open_clip model, its workdir imported by the tool, the seed) for ViT-S-32 (ViT-B-32
    at half the width: the same code, a quarter of the test's time) whose every tensor is
    perturbed (LayerNorm gains, biases included: a swapped or dropped tensor shows), its
    logit scale set past open_clip's clamp of 100."""
    seed = random_seed()
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.02)
        model.logit_scale.fill_(math.log(150.0))
    directory = tmp_path_factory.mktemp("open_clip")
    weights = str(directory / "vit_s32.safetensors")
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, weights)
    workdir = str(directory / "run")
    assert import_open_clip.main(["--model", "ViT-S-32", "--weights", weights,
                                  "--workdir", workdir]) == 0
    return model, workdir, seed


def small_eval_batches(workdir):
    config = config_lib.load_saved(workdir)
    config.eval.batch_size = 8  # one per simulated device
    return config


def test_embeddings_and_logit_scale_equal_open_clip(imported):
    model, workdir, seed = imported
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    mean, std = (np.asarray(s, np.float32) for s in (open_clip.OPENAI_DATASET_MEAN,
                                                      open_clip.OPENAI_DATASET_STD))
    images = torch.from_numpy(((pixels / np.float32(255) - mean) / std).transpose(0, 3, 1, 2))
    with torch.no_grad():
        want_images = model.encode_image(images.float(), normalize=True).numpy()
        want_texts = model.encode_text(open_clip.tokenize(TRICKY_TEXTS), normalize=True).numpy()
    loaded = bigalign.load(workdir, config=small_eval_batches(workdir))
    # 1e-5, not the 1e-4 asked for: at 1e-4 a tanh-approximated GELU (flax's default) passes.
    np.testing.assert_allclose(loaded.embed_image(pixels), want_images, atol=1e-5, rtol=0,
                               err_msg=f"seed {seed}")
    np.testing.assert_allclose(loaded.embed_text(TRICKY_TEXTS), want_texts, atol=1e-5, rtol=0,
                               err_msg=f"seed {seed}")
    # open_clip clamps the scale to 100 after every step; bigalign caps it in the forward pass.
    assert loaded.logit_scale == pytest.approx(min(model.logit_scale.exp().item(), 100.0))
    assert loaded.config.model.max_logit_scale == 100.0


def test_lit_from_the_import_keeps_the_image_tower(imported, tmp_path):
    """LiT: a new run locks the imported image tower and trains a small text tower on the
    built-in data; the text tower moves, the image tower stays bit-identical to the import."""
    _, workdir, _ = imported
    config = small_eval_batches(workdir)
    config.update(batch_size=8, total_steps=2, log_every=1, checkpoint_every=1)
    config.optimizer.warmup_steps = 1
    config.data.update(num_train=16, num_eval=8)
    config.model.image.update(init_from=workdir, frozen=True)
    config.model.text.update(depth=1, width=64, num_heads=1, mlp_dim=128)
    config.text.max_len = 16
    run_dir = str(tmp_path / "lit")
    results = train.train_and_evaluate(config, run_dir)
    assert results, "the run ends with its evaluation"
    imported_image = saved_params(workdir, 0)["image"]
    first, last = (saved_params(run_dir, step) for step in (1, 2))
    for got, want in zip(jax.tree.leaves(last["image"]), jax.tree.leaves(imported_image)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(first["text"]["projection"]["kernel"]),
                              np.asarray(last["text"]["projection"]["kernel"]))


def test_refusals_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not supported"):
        open_clip_import.model_config("RN50", {})
    pickle_with_code = tmp_path / "model.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "optimizer": torch.optim.SGD}, pickle_with_code)
    with pytest.raises(UserError, match="weights_only"):
        open_clip_import.read_state_dict(str(pickle_with_code))
    with pytest.raises(UserError, match="expected a .safetensors"):
        open_clip_import.read_state_dict(str(tmp_path / "model.npz"))
