"""The recipe configs (configs/*.py): each loads and validates, its towers have the
published parameter counts (from jax.eval_shape, no weights are made), and the
settings that carry a recipe's meaning are the source's."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from bigalign import config as config_lib
from bigalign.data import pipeline
from bigalign.errors import UserError
from bigalign.models import towers
from bigalign.optimizer import make_optimizer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def recipe(name: str, *args):
    """get_config(*args) of configs/<name>.py, loaded from its path as --config does."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*args)
    config_lib.validate(config)
    return config


def parameter_counts(config) -> dict:
    """{tower: number of parameters} of the config's model, from shapes alone."""
    model = towers.build_model(config.model, vocab_size=config.text.vocab_size,
                               max_len=config.text.max_len)
    shapes = pipeline.input_shapes(config.data, max_len=config.text.max_len)
    batch = {name: jax.ShapeDtypeStruct((1, *shape), np.uint8 if name == "image" else
                                        np.int32 if name == "text" else np.float32)
             for name, shape in shapes.items()}
    params = jax.eval_shape(lambda batch: model.init(jax.random.key(0), batch), batch)["params"]
    return {name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
            for name, tree in params.items()}


# Parameter counts from the architectures' definitions, written out here.
def transformer(width, depth, mlp):
    """Pre-LN blocks (attention with biased q, k, v, out; a biased 2-layer MLP; two
    LayerNorms) and the final LayerNorm."""
    block = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 2 * 2 * width
    return depth * block + 2 * width


def attention_pooling(width, mlp):
    """A learned probe, attention, a LayerNorm and an MLP (big_vision's MAPHead)."""
    return width + 4 * width * width + 4 * width + 2 * width + 2 * width * mlp + mlp + width


def vit(*, width, depth, mlp, patch, tokens, channels=3, patch_bias=True, ln_pre=False,
        pool="gap", embed, projection_bias=False, projection=True):
    count = patch * patch * channels * width + patch_bias * width  # patch embedding
    count += tokens * width + transformer(width, depth, mlp) + 2 * ln_pre * width
    count += {"gap": 0, "cls": width, "map": attention_pooling(width, mlp)}[pool]
    return count + projection * (width * embed + projection_bias * embed)


def text_transformer(*, width, depth, mlp, vocab, length, embed, projection_bias=False):
    table_and_positions = vocab * width + length * width
    projection = width * embed + projection_bias * embed
    return table_and_positions + transformer(width, depth, mlp) + projection


B = dict(width=768, depth=12, mlp=3072)  # ViT-B (Dosovitskiy et al. 2021, table 1)

# Published sizes: open_clip's ViT-B-16 (OpenAI's CLIP ViT-B/16) and ViT-B-16-SigLIP (the
# big_vision SigLIP B/16 checkpoint as timm builds it), counted from open_clip 3.3's
# models (open_clip.create_model(name, pretrained=None)), without the logit scale / bias.
CLIP_B16 = {"image": 86_192_640, "text": 63_428_096}
SIGLIP_B16 = {"image": 92_884_224, "text": 110_271_744}
VIT_B16 = 86e6  # "ViT-Base ... 86M" (Dosovitskiy et al. 2021, table 1)


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Workdirs with the saved configs of a CLIP B/16 and a SigLIP B/16 run (no weights:
    the configs below only read config.json; init_from needs the directory to exist)."""
    runs = {}
    for name in ("clip_b16", "siglip_b16"):
        runs[name] = str(tmp_path_factory.mktemp(name))
        config_lib.save(recipe(name), runs[name])
    return runs


def first_step_decay(config) -> float:
    """The relative decay of a weight matrix in the first step with a zero gradient, at
    the peak learning rate (warmup removed): what `optimizer.weight_decay` means."""
    config.optimizer.warmup_steps = 0
    optimizer = make_optimizer(config)
    params = {"dense": {"kernel": np.ones((2, 2), np.float32)}}
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    return float(-updates["dense"]["kernel"][0, 0])


def test_siglip_b16_is_the_published_siglip_with_big_vision_weight_decay():
    config = recipe("siglip_b16")
    counts = parameter_counts(config)
    image = vit(**B, patch=16, tokens=14 * 14, pool="map", embed=768, projection=False)
    text = text_transformer(**B, vocab=32_000, length=64, embed=768, projection_bias=True)
    assert (counts["image"], counts["text"]) == (image, text)
    assert (image, text) == (SIGLIP_B16["image"], SIGLIP_B16["text"])
    opt = config.optimizer
    assert (opt.learning_rate, opt.weight_decay, opt.b2, opt.warmup_steps) == (
        1e-3, 1e-4, 0.95, 20_000)
    assert (opt.weight_decay_mode, opt.weight_decay_mask) == ("big_vision", "kernels")
    assert config.batch_size == 32768 and config.loss.name.startswith("sigmoid")
    np.testing.assert_allclose(first_step_decay(config), 1e-4, rtol=1e-5)  # not 1e-4 x 1e-3


def test_clip_b16_is_openai_clip_with_open_clip_adamw():
    config = recipe("clip_b16")
    counts = parameter_counts(config)
    image = vit(**B, patch=16, tokens=14 * 14, patch_bias=False, ln_pre=True, pool="cls", embed=512)
    text = text_transformer(width=512, depth=12, mlp=2048, vocab=49_408, length=77, embed=512)
    assert (counts["image"], counts["text"]) == (image, text)
    assert text == CLIP_B16["text"]
    # OpenAI's position table has a row for the class token; bigalign adds the class token
    # after the positions, so that row folds into it (a constant either way).
    assert CLIP_B16["image"] - image == 768
    assert abs(image - VIT_B16) / VIT_B16 < 0.01
    opt = config.optimizer
    assert (opt.learning_rate, opt.weight_decay, opt.b1, opt.b2, opt.eps, opt.warmup_steps) == (
        5e-4, 0.2, 0.9, 0.98, 1e-6, 2000)
    assert (opt.weight_decay_mode, opt.weight_decay_mask, opt.grad_clip_norm) == (
        "optax", "all_but_gains_and_biases", 0.0)
    assert config.batch_size == 32768 and config.loss.name.startswith("softmax")
    assert config.total_steps * config.batch_size == pytest.approx(32 * 400e6, rel=1e-4)
    np.testing.assert_allclose(first_step_decay(config), 0.2 * 5e-4, rtol=1e-5)  # torch's AdamW


def test_lit_locks_the_image_tower_of_the_run_it_is_given(saved_runs):
    config = recipe("lit", saved_runs["clip_b16"])
    clip = recipe("clip_b16")
    image = config.model.image
    assert image.frozen and image.init_from == saved_runs["clip_b16"]
    for key, value in clip.model.image.items():  # the saved tower's shapes and options
        if key not in ("frozen", "init_from"):
            assert image[key] == value, key
    assert config.model.embed_dim == clip.model.embed_dim == 512
    counts = parameter_counts(config)
    assert counts["image"] == parameter_counts(clip)["image"]
    # The text tower: a BERT-Base-sized Transformer (110M in the BERT paper).
    assert counts["text"] == text_transformer(**B, vocab=32_000, length=16, embed=512,
                                              projection_bias=True)
    assert abs(counts["text"] - 110e6) / 110e6 < 0.02
    opt = config.optimizer
    assert (opt.learning_rate, opt.weight_decay, opt.weight_decay_mode, opt.warmup_steps) == (
        1e-3, 0.01, "big_vision", 150)
    with pytest.raises(UserError, match="configs/lit.py needs the run"):
        recipe("lit")


def test_siglip_finetuning_starts_every_parameter_from_the_given_run(saved_runs):
    run = saved_runs["siglip_b16"]
    config = recipe("siglip_finetune_csv", run)
    siglip = recipe("siglip_b16")
    assert config.model.init_from == run  # the towers, the logit scale and bias
    for tower in ("image", "text"):
        assert not config.model[tower].init_from and not config.model[tower].frozen
    assert parameter_counts(config) == parameter_counts(siglip)
    assert config.text.to_dict() == siglip.text.to_dict()
    assert config.data.name.startswith("csv:") and config.loss.name == "sigmoid"
    assert config.optimizer.learning_rate < siglip.optimizer.learning_rate
    with pytest.raises(UserError, match="has no saved config"):
        recipe("siglip_finetune_csv", CONFIGS)  # a directory, but no run


def test_three_tower_binds_image_and_audio_to_text():
    config = recipe("three_tower")
    assert towers.tower_names(config.model) == ["audio", "image", "text"]
    assert config.loss.pairs == (("image", "text"), ("audio", "text"))
    frames, mels = pipeline.input_shapes(config.data, max_len=config.text.max_len)["audio"]
    assert (frames, mels) == (1024, 128)  # AST's input: 1024 frames of 10 ms, 128 mel bins
    counts = parameter_counts(config)
    audio = vit(**B, patch=16, tokens=(1024 // 16) * (128 // 16), channels=1, pool="cls", embed=768)
    assert counts["audio"] == audio
    assert abs(audio - VIT_B16) / VIT_B16 < 0.02  # a ViT-B on spectrogram patches
    assert counts["image"] == parameter_counts(recipe("siglip_b16"))["image"]
