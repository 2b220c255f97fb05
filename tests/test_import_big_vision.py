"""tools/import_big_vision.py on a SigLIP .npz built here with the parameter names and
shapes big_vision uses (models/vit.py, models/proj/image_text/text_transformer.py,
two_towers.py: see bigalign/published/big_vision.py), checked against a NumPy forward
pass of that architecture written from big_vision's description, not from bigalign's
modules."""

import os
import shutil
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm

import bigalign
from bigalign import config as config_lib, train
from bigalign.errors import UserError
from bigalign.published import big_vision
from helpers import random_seed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import import_big_vision  # noqa: E402

IMAGE = dict(width=32, depth=2, heads=2, mlp=64, patch=4, size=16)
TEXT = dict(width=24, depth=2, heads=3, mlp=48, length=8)
EMBED = IMAGE["width"]  # no image head (out_dim=(None, dim)): the text head maps to it
TEXTS = ["a red circle", "a small blue square on the left", "green"]


def siglip_npz(rng, vocab: int) -> dict[str, np.ndarray]:
    """Random arrays under big_vision's names: the image blocks stacked (scan=True), the
    text blocks one by one; the MAP head, no image head, a text head, t and b."""

    def normal(*shape, scale=0.3):
        return rng.normal(0, scale, shape).astype(np.float32)

    def block(prefix, width, heads, mlp, layers=None):
        lead = () if layers is None else (layers,)
        kv = width // heads
        arrays = {}
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            arrays[f"{prefix}/{norm}/scale"] = 1 + normal(*lead, width, scale=0.1)
            arrays[f"{prefix}/{norm}/bias"] = normal(*lead, width, scale=0.1)
        for name in ("query", "key", "value"):
            arrays[f"{prefix}/MultiHeadDotProductAttention_0/{name}/kernel"] = normal(*lead, width, heads, kv)
            arrays[f"{prefix}/MultiHeadDotProductAttention_0/{name}/bias"] = normal(*lead, heads, kv, scale=0.1)
        arrays[f"{prefix}/MultiHeadDotProductAttention_0/out/kernel"] = normal(*lead, heads, kv, width)
        arrays[f"{prefix}/MultiHeadDotProductAttention_0/out/bias"] = normal(*lead, width, scale=0.1)
        arrays[f"{prefix}/MlpBlock_0/Dense_0/kernel"] = normal(*lead, width, mlp)
        arrays[f"{prefix}/MlpBlock_0/Dense_0/bias"] = normal(*lead, mlp, scale=0.1)
        arrays[f"{prefix}/MlpBlock_0/Dense_1/kernel"] = normal(*lead, mlp, width)
        arrays[f"{prefix}/MlpBlock_0/Dense_1/bias"] = normal(*lead, width, scale=0.1)
        return arrays

    w, p = IMAGE["width"], IMAGE["patch"]
    patches = (IMAGE["size"] // p) ** 2
    arrays = {"img/embedding/kernel": normal(p, p, 3, w), "img/embedding/bias": normal(w),
              "img/pos_embedding": normal(1, patches, w),
              **block("img/Transformer/encoderblock", w, IMAGE["heads"], IMAGE["mlp"], IMAGE["depth"]),
              "img/Transformer/encoder_norm/scale": 1 + normal(w, scale=0.1),
              "img/Transformer/encoder_norm/bias": normal(w, scale=0.1),
              "img/MAPHead_0/probe": normal(1, 1, w)}
    head = block("img/MAPHead_0", w, IMAGE["heads"], IMAGE["mlp"])  # its names, minus LayerNorm_1
    arrays.update({k: v for k, v in head.items() if "LayerNorm_1" not in k})
    t = TEXT["width"]
    # Small token embeddings, so that LayerNorm's epsilon (1e-6) matters in the first block.
    arrays.update({"txt/Embed_0/embedding": normal(vocab, t, scale=0.003),
                   "txt/pos_embedding": normal(1, TEXT["length"], t, scale=0.003),
                   "txt/Encoder_0/encoder_norm/scale": 1 + normal(t, scale=0.1),
                   "txt/Encoder_0/encoder_norm/bias": normal(t, scale=0.1),
                   "txt/head/kernel": normal(t, EMBED), "txt/head/bias": normal(EMBED),
                   "t": np.log([rng.uniform(5, 20)]).astype(np.float32),
                   "b": np.asarray([rng.uniform(-12, -8)], np.float32)})
    for i in range(TEXT["depth"]):
        arrays.update(block(f"txt/Encoder_0/encoderblock_{i}", t, TEXT["heads"], TEXT["mlp"]))
    return {f"params/{name}": value for name, value in arrays.items()}  # saved with its optimizer


# --- the published architecture in NumPy ---------------------------------------------


def layer_norm(x, p, prefix):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p[f"{prefix}/scale"] + p[f"{prefix}/bias"]


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def dense(x, p, prefix):
    return x @ p[f"{prefix}/kernel"] + p[f"{prefix}/bias"]


def attention(queries, keys, p, prefix):
    def project(x, name):
        return np.einsum("btw,whk->bthk", x, p[f"{prefix}/{name}/kernel"]) + p[f"{prefix}/{name}/bias"]

    q, k, v = project(queries, "query"), project(keys, "key"), project(keys, "value")
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum("bhqt,bthk->bqhk", weights, v)
    return np.einsum("bqhk,hkw->bqw", mixed, p[f"{prefix}/out/kernel"]) + p[f"{prefix}/out/bias"]


def mlp(x, p, prefix):
    return dense(gelu_tanh(dense(x, p, f"{prefix}/Dense_0")), p, f"{prefix}/Dense_1")


def encoder(x, p, prefix, depth):
    for i in range(depth):
        y = layer_norm(x, p, f"{prefix}_{i}/LayerNorm_0")
        x = x + attention(y, y, p, f"{prefix}_{i}/MultiHeadDotProductAttention_0")
        x = x + mlp(layer_norm(x, p, f"{prefix}_{i}/LayerNorm_1"), p, f"{prefix}_{i}/MlpBlock_0")
    return x


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_image_embeddings(p, pixels):
    x = pixels.astype(np.float64) / 127.5 - 1
    b, size, _, c = x.shape
    patch = IMAGE["patch"]
    grid = size // patch
    x = x.reshape(b, grid, patch, grid, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("bhwijc,ijcd->bhwd", x, p["img/embedding/kernel"]) + p["img/embedding/bias"]
    x = x.reshape(b, grid * grid, -1) + p["img/pos_embedding"]
    x = encoder(x, p, "img/Transformer/encoderblock", IMAGE["depth"])
    x = layer_norm(x, p, "img/Transformer/encoder_norm")
    probe = np.broadcast_to(p["img/MAPHead_0/probe"], (b, 1, x.shape[-1]))
    y = attention(probe, x, p, "img/MAPHead_0/MultiHeadDotProductAttention_0")
    y = y + mlp(layer_norm(y, p, "img/MAPHead_0/LayerNorm_0"), p, "img/MAPHead_0/MlpBlock_0")
    return unit(y[:, 0])


def reference_text_embeddings(p, ids):
    x = p["txt/Embed_0/embedding"][ids] + p["txt/pos_embedding"]
    x = encoder(x, p, "txt/Encoder_0/encoderblock", TEXT["depth"])
    x = layer_norm(x, p, "txt/Encoder_0/encoder_norm")
    return unit(dense(x[:, -1], p, "txt/head"))


def unstacked(p):
    """The image blocks stacked on a layer axis as `encoderblock_{i}` (for the reference)."""
    out = {}
    for name, value in p.items():
        if "/encoderblock/" in name:
            for i in range(value.shape[0]):
                out[name.replace("/encoderblock/", f"/encoderblock_{i}/")] = value[i].astype(np.float64)
        else:
            out[name] = value.astype(np.float64)
    return out


def big_vision_ids(model_file, texts, length):
    """big_vision's tokenize(eos="sticky", pad_value=1): lowercase, pieces, EOS (1), pad 1."""
    processor = spm.SentencePieceProcessor(model_file=model_file)
    rows = [processor.encode(text.lower())[: length - 1] + [1] for text in texts]
    return np.asarray([row + [1] * (length - len(row)) for row in rows])


@pytest.fixture(scope="module")
def imported(t5_style_model, tmp_path_factory):
    """(the checkpoint's arrays, the workdir the tool imported them into, the seed)."""
    seed = random_seed()
    vocab = spm.SentencePieceProcessor(model_file=t5_style_model).get_piece_size()
    arrays = siglip_npz(np.random.default_rng(seed), vocab)
    directory = tmp_path_factory.mktemp("big_vision")
    weights = str(directory / "siglip.npz")
    np.savez(weights, **arrays)
    workdir = str(directory / "run")
    assert import_big_vision.main(["--weights", weights, "--tokenizer", t5_style_model,
                                   "--workdir", workdir]) == 0
    assert import_big_vision.main(["--weights", weights, "--tokenizer", t5_style_model,
                                   "--workdir", workdir]) == 1  # "already holds a run"
    p = unstacked({name.removeprefix("params/"): value for name, value in arrays.items()})
    return p, workdir, seed


def small_config(workdir, **changes):
    config = config_lib.load_saved(workdir)
    config.eval.batch_size = 8
    config.update(changes)
    return config


def test_embeddings_and_scale_equal_the_published_architecture(imported, t5_style_model):
    p, workdir, seed = imported
    rng = np.random.default_rng(seed)
    loaded = bigalign.load(workdir, config=small_config(workdir))
    pixels = rng.integers(0, 256, (3, IMAGE["size"], IMAGE["size"], 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.embed_image(pixels), reference_image_embeddings(p, pixels),
                               atol=2e-5, rtol=0, err_msg=f"seed {seed}")
    ids = big_vision_ids(t5_style_model, TEXTS, TEXT["length"])
    np.testing.assert_allclose(loaded.embed_text(TEXTS), reference_text_embeddings(p, ids),
                               atol=2e-5, rtol=0, err_msg=f"seed {seed}")
    assert loaded.logit_scale == pytest.approx(np.exp(p["t"][0]), rel=1e-6)
    assert loaded.logit_bias == pytest.approx(p["b"][0], rel=1e-6)


@pytest.mark.parametrize("where", ["model.init_from", "the imported workdir"])
def test_training_starts_from_the_import(imported, tmp_path, where):
    """One step of fine-tuning, in a new run with model.init_from or in the imported
    workdir itself: every parameter moves at most about the learning rate from the
    import (Adam's first step is ~lr per element); a fresh initialisation is ~0.3 away."""
    p, workdir, seed = imported
    config = small_config(workdir, batch_size=8, total_steps=1, checkpoint_every=1)
    config.optimizer.update(warmup_steps=0, learning_rate=1e-4)
    config.data.update(num_train=16, num_eval=8)
    config.evals = {}
    run_dir = str(tmp_path / "tuned")
    if where == "model.init_from":
        config.model.init_from = workdir
    else:
        shutil.copytree(workdir, run_dir)  # (its config still names the tokenizer there)
    train.train_and_evaluate(config, run_dir)
    tuned = bigalign.load(run_dir, 1, config=config)
    start = bigalign.load(workdir, config=small_config(workdir))
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(tuned.params), jax.tree.leaves(start.params))]
    assert max(moved) < 3e-4, f"seed {seed}"
    assert tuned.logit_bias == pytest.approx(p["b"][0], abs=3e-4)


def test_projection_none_needs_the_embedding_width(imported):
    config = small_config(imported[1])
    config.model.embed_dim = IMAGE["width"] * 2
    with pytest.raises(UserError, match="projection='none' uses the pooled features"):
        config_lib.validate(config)


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    arrays = siglip_npz(np.random.default_rng(random_seed()), 100)
    shapes = {name.removeprefix("params/"): value.shape for name, value in arrays.items()}
    with pytest.raises(UserError, match="--variant B/16 is"):
        big_vision.model_config(shapes, "B/16")
    with pytest.raises(UserError, match="not a big_vision two-tower"):
        big_vision.model_config({"embedding/kernel": (4, 4, 3, 8)})
    with pytest.raises(UserError, match="expected a big_vision .npz"):
        big_vision.read_npz(str(tmp_path / "model.safetensors"))
