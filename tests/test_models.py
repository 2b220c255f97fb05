"""Towers and the contrastive model: shapes, normalisation, masking, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigalign.models.text import TextTransformer
from bigalign.models.towers import ContrastiveModel
from bigalign.models.vit import VisionTransformer


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def encoder_block_params(width: int, mlp_dim: int) -> int:
    """Two LayerNorms, q/k/v/out projections with biases, and the two-layer MLP."""
    return 2 * 2 * width + 4 * (width * width + width) + (width * mlp_dim + mlp_dim) + (mlp_dim * width + width)


@pytest.mark.parametrize("pool", ["gap", "cls", "map"])
def test_vit_output_and_parameter_count(pool):
    patch, width, depth, mlp, size = 4, 32, 2, 48, 16
    vit = VisionTransformer(patch, width, depth, num_heads=4, mlp_dim=mlp, pool=pool)
    images = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (3, size, size, 3))
    params = vit.init(jax.random.key(0), images)["params"]
    features = vit.apply({"params": params}, images)
    assert features.shape == (3, width)
    tokens = (size // patch) ** 2
    expected = (patch * patch * 3 * width + width) + tokens * width  # patch embedding, positions
    expected += depth * encoder_block_params(width, mlp) + 2 * width  # blocks, final LayerNorm
    if pool == "cls":
        expected += width
    if pool == "map":
        # probe, then attention + MLP as in a block but with a single LayerNorm
        expected += width + encoder_block_params(width, mlp) - 2 * width
    assert count(params) == expected


def make_text_tower(pool="last", causal=True):
    return TextTransformer(
        vocab_size=50, max_len=10, width=32, depth=2, num_heads=4, mlp_dim=64, causal=causal, pool=pool
    )


def random_tokens(rng, batch, lengths, max_len=10):
    """Tokens in [3, 50) followed by padding (0) after each row's length."""
    tokens = rng.integers(3, 50, size=(batch, max_len))
    tokens[np.arange(max_len)[None, :] >= np.asarray(lengths)[:, None]] = 0
    return jnp.asarray(tokens, jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", ["last", "first", "map"])
def test_text_tower_ignores_padding(pool, causal):
    """Shortening the padded max length does not change the output: padding is masked out."""
    rng = np.random.default_rng()
    tower = make_text_tower(pool, causal)
    tokens = random_tokens(rng, 4, [3, 5, 7, 6])
    params = tower.init(jax.random.key(0), tokens)["params"]
    full = tower.apply({"params": params}, tokens)
    short = tower.apply({"params": params}, tokens[:, :7])
    np.testing.assert_allclose(full, short, rtol=1e-5, atol=1e-6)


def test_causal_text_tower_first_token_sees_only_itself():
    rng = np.random.default_rng()
    tower = make_text_tower("first", causal=True)
    tokens = random_tokens(rng, 2, [6, 6])
    changed = tokens.at[:, 1:6].set(jnp.asarray(rng.integers(3, 50, size=(2, 5)), jnp.int32))
    params = tower.init(jax.random.key(0), tokens)["params"]
    np.testing.assert_allclose(
        tower.apply({"params": params}, tokens), tower.apply({"params": params}, changed), rtol=1e-5
    )


def test_contrastive_model_embeddings_are_unit_length_and_per_modality():
    towers = {
        "image": dict(kind="vit", patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64),
        "text": dict(kind="text", vocab_size=50, max_len=10, width=32, depth=1, num_heads=2, mlp_dim=64),
    }
    model = ContrastiveModel(towers, embed_dim=8, init_logit_scale=np.log(10.0), init_logit_bias=-10.0)
    rng = np.random.default_rng()
    batch = {
        "image": jnp.asarray(rng.normal(size=(5, 16, 16, 3)), jnp.float32),
        "text": random_tokens(rng, 5, rng.integers(1, 11, size=5)),
    }
    params = model.init(jax.random.key(0), batch)["params"]
    assert set(params) == {"image", "text", "logit_scale", "logit_bias"}
    outputs = model.apply({"params": params}, batch)
    for modality in ("image", "text"):
        embeddings = outputs["embeddings"][modality]
        assert embeddings.shape == (5, 8)
        np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(outputs["logit_scale"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(outputs["logit_bias"], -10.0)
    only_images = model.apply({"params": params}, {"image": batch["image"]})
    assert set(only_images["embeddings"]) == {"image"}
    np.testing.assert_allclose(only_images["embeddings"]["image"], outputs["embeddings"]["image"], rtol=1e-6)
