"""Towers and the contrastive model: shapes, normalisation, masking, parameter counts,
FSDP annotations, compute dtype, remat, scanned layers and config resolution."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigalign.models import audio, sizes, towers, vit as vit_module
from bigalign.models.text import TextTransformer
from bigalign.models.towers import ContrastiveModel
from bigalign.models.transformer import REMAT_POLICIES, EncoderBlock, MultiHeadAttention
from bigalign.models.vit import VisionTransformer
from helpers import KEY_BIASES, assert_trees_close, dtypes, equations, random_seed

LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "layers", "proj", None}


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def encoder_block_params(width: int, mlp_dim: int) -> int:
    """Two LayerNorms, q/k/v/out projections with biases, and the two-layer MLP."""
    return 2 * 2 * width + 4 * (width * width + width) + (width * mlp_dim + mlp_dim) + (mlp_dim * width + width)


def patch_encoder_params(patch_pixels, tokens, width, depth, mlp, pool) -> int:
    """Patch embedding, positions, blocks, final LayerNorm, and the pooling's own parameters."""
    expected = (patch_pixels * width + width) + tokens * width
    expected += depth * encoder_block_params(width, mlp) + 2 * width
    if pool == "cls":
        expected += width
    if pool == "map":
        # probe, then attention + MLP as in a block but with a single LayerNorm
        expected += width + encoder_block_params(width, mlp) - 2 * width
    return expected


@pytest.mark.parametrize("pool", ["gap", "cls", "map"])
def test_vit_output_shape_and_parameter_count(pool):
    """Traced only (eval_shape); the audio tower below runs the same code on real numbers."""
    patch, width, depth, mlp, size = 4, 32, 2, 48, 16
    vit = VisionTransformer(patch, width, depth, num_heads=4, mlp_dim=mlp, pool=pool)
    images = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    params = nn.unbox(jax.eval_shape(vit.init, jax.random.key(0), images)["params"])
    output = jax.eval_shape(vit.apply, {"params": params}, images)
    tokens = (size // patch) ** 2
    assert output.pooled.shape == (3, width)
    assert output.tokens.shape == (3, tokens + (pool == "cls"), width)  # the sequence before pooling
    assert count(params) == patch_encoder_params(patch * patch * 3, tokens, width, depth, mlp, pool)


def test_vit_scales_uint8_pixels_to_the_unit_range():
    rng = np.random.default_rng(random_seed())
    pixels = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    vit = VisionTransformer(4, 16, 1, num_heads=2, mlp_dim=32)
    params = vit.init(jax.random.key(int(rng.integers(1000))), pixels.astype(np.float32))
    scaled = pixels.astype(np.float32) / 255 * 2 - 1
    assert scaled.min() >= -1 and scaled.max() <= 1
    np.testing.assert_allclose(vit.apply(params, jnp.asarray(pixels)).pooled,
                               vit.apply(params, scaled).pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool, patch_size", [("gap", 4)] + [(pool, (8, 2)) for pool in audio.POOLINGS])
def test_audio_tower_output_and_parameter_count(pool, patch_size):
    """Spectrogram patches are (frames, mels); frames past the last whole patch are dropped."""
    frames, mels, width, depth, mlp = 30, 16, 32, 2, 48
    tower = audio.AudioTransformer(patch_size, width, depth, num_heads=4, mlp_dim=mlp, pool=pool)
    spectrograms = jnp.asarray(np.random.default_rng(random_seed()).normal(size=(3, frames, mels)), jnp.float32)
    params = nn.unbox(jax.jit(tower.init)(jax.random.key(0), spectrograms)["params"])
    features, sequence = jax.jit(tower.apply)({"params": params}, spectrograms)
    assert features.shape == (3, width)
    assert np.isfinite(features).all()
    patch_frames, patch_mels = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    tokens = (frames // patch_frames) * (mels // patch_mels)
    assert params["position_embedding"].shape == (1, tokens, width)
    assert sequence.shape == (3, tokens + (pool == "cls"), width)
    if pool == "gap":
        np.testing.assert_allclose(features, sequence.mean(axis=1), rtol=1e-5, atol=1e-6)
    expected = patch_encoder_params(patch_frames * patch_mels, tokens, width, depth, mlp, pool)
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


@pytest.fixture(scope="module")
def text_params():
    """Parameters for every text pooling: those of "map", a superset of the others'."""
    tokens = random_tokens(np.random.default_rng(random_seed()), 1, [10])
    return jax.jit(make_text_tower("map").init)(jax.random.key(0), tokens)["params"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", ["last", "first", "map"])
def test_text_tower_ignores_padding(pool, causal, text_params):
    """Shortening the padded max length does not change the output: padding is masked out."""
    rng = np.random.default_rng(random_seed())
    tower = make_text_tower(pool, causal)
    tokens = random_tokens(rng, 4, [3, 5, 7, 6])
    apply = jax.jit(tower.apply)
    full = apply({"params": text_params}, tokens).pooled
    short = apply({"params": text_params}, tokens[:, :7]).pooled
    np.testing.assert_allclose(full, short, rtol=1e-5, atol=1e-6)


def test_causal_text_tower_first_token_sees_only_itself(text_params):
    rng = np.random.default_rng(random_seed())
    tower = make_text_tower("first", causal=True)
    tokens = random_tokens(rng, 2, [6, 6])
    changed = tokens.at[:, 1:6].set(jnp.asarray(rng.integers(3, 50, size=(2, 5)), jnp.int32))
    apply = jax.jit(tower.apply)
    first, sequence = apply({"params": text_params}, tokens)
    np.testing.assert_allclose(first, sequence[:, 0], rtol=1e-6)  # "first" pools token 0
    np.testing.assert_allclose(first, apply({"params": text_params}, changed).pooled, rtol=1e-5)


def numpy_attention(params, x, kv, num_heads, causal, key_lengths):
    """Multi-head attention written out in float64 NumPy, from the parameters alone."""
    def project(name, inputs):  # [B, T, W] -> [B, T, heads, kv]
        p = params[name]
        return np.einsum("btw,whk->bthk", inputs, p["kernel"]) + p["bias"]

    q, k, v = project("query", x), project("key", kv), project("value", kv)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    queries, keys = np.arange(x.shape[1])[:, None], np.arange(kv.shape[1])[None, :]
    allowed = np.ones((x.shape[0], 1, x.shape[1], kv.shape[1]), bool)
    if causal:
        allowed &= keys <= queries
    if key_lengths is not None:
        allowed &= keys < np.asarray(key_lengths)[:, None, None, None]
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return np.einsum("bthk,hkw->btw", y, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.parametrize("causal,with_lengths", [(False, False), (True, False), (False, True),
                                                 (True, True)])
def test_attention_matches_numpy(causal, with_lengths):
    """Self-attention with causal and key-padding masks, against the formula: what
    jax.nn.dot_product_attention computes here must be what the towers mean."""
    seed = random_seed()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 7, 16)).astype(np.float32)
    lengths = jnp.asarray([7, 4, 1]) if with_lengths else None
    attention = MultiHeadAttention(num_heads=2, causal=causal)
    params = nn.unbox(attention.init(jax.random.key(seed % 2**31), x, x)["params"])
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape), params)
    got = jax.jit(attention.apply)({"params": params}, x, x, lengths)
    as_numpy = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    expected = numpy_attention(as_numpy, x.astype(np.float64), x.astype(np.float64), 2, causal,
                               lengths)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")


def small_towers(kinds=("vit", "text", "audio"), **shared):
    """Tiny towers named image/text/audio; `shared` (dtype, remat, scan_layers, ...) goes to each."""
    dims = dict(width=32, depth=2, num_heads=2, mlp_dim=64, **shared)
    every = {
        "image": dict(kind="vit", patch_size=4, pool="map", **dims),
        "text": dict(kind="text", vocab_size=50, max_len=10, **dims),
        "audio": dict(kind="audio", patch_size=(4, 2), pool="cls", **dims),
    }
    return {name: tower for name, tower in every.items() if tower["kind"] in kinds}


def make_model(kinds=("vit", "text", "audio"), **shared):
    return ContrastiveModel(
        small_towers(kinds, **shared), embed_dim=8, init_logit_scale=np.log(10.0), init_logit_bias=-10.0
    )


def random_batch(rng, batch=5):
    return {
        "image": jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32),
        "text": random_tokens(rng, batch, rng.integers(1, 11, size=batch)),
        "audio": jnp.asarray(rng.normal(size=(batch, 12, 8)), jnp.float32),
    }


@pytest.fixture(scope="module")
def boxed_params():
    """Annotated parameters of `make_model()`, initialised once (compiling is the slow part on CPU)."""
    return jax.jit(make_model().init)(jax.random.key(0), random_batch(np.random.default_rng(random_seed())))["params"]


@pytest.fixture(scope="module")
def reference(boxed_params):
    """A random batch and `make_model()`'s float32 outputs on it: what variants must reproduce."""
    batch = random_batch(np.random.default_rng(random_seed()))
    return batch, jax.jit(make_model().apply)({"params": nn.unbox(boxed_params)}, batch)


def test_contrastive_model_embeddings_are_unit_length_and_per_modality(boxed_params, reference):
    model, params = make_model(), nn.unbox(boxed_params)
    batch, outputs = reference
    assert set(params) == {"image", "text", "audio", "logit_scale", "logit_bias"}
    assert all(set(params[m]) == {"encoder", "projection"} for m in ("image", "text", "audio"))
    apply = jax.jit(model.apply)
    for modality in ("image", "text", "audio"):
        embeddings = outputs["embeddings"][modality]
        assert embeddings.shape == (5, 8) and embeddings.dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(outputs["logit_scale"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(outputs["logit_bias"], -10.0)
    only_images = apply({"params": params}, {"image": batch["image"]})
    assert set(only_images["embeddings"]) == {"image"}
    np.testing.assert_allclose(only_images["embeddings"]["image"], outputs["embeddings"]["image"], rtol=1e-6)
    scale_and_bias = apply({"params": params}, {})
    assert scale_and_bias["embeddings"] == {}
    np.testing.assert_allclose(scale_and_bias["logit_scale"], 10.0, rtol=1e-6)


def is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def assert_fully_annotated(boxed):
    """Every leaf is boxed with one known logical name (or None) per dimension."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box):
        where = jax.tree_util.keystr(path)
        assert is_box(leaf), f"{where} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} for shape {leaf.value.shape}"
        assert set(leaf.names) <= LOGICAL_NAMES, f"{where}: unexpected names {leaf.names}"


def test_every_parameter_has_logical_axis_names(boxed_params, reference):
    assert_fully_annotated(boxed_params)
    attention = boxed_params["text"]["encoder"]["encoder"]["block0"]["attention"]
    assert attention["query"]["kernel"].names == ("embed", "heads", "kv")
    assert attention["out"]["kernel"].names == ("heads", "kv", "embed")
    assert boxed_params["image"]["projection"]["kernel"].names == ("embed", "proj")
    assert boxed_params["logit_scale"].names == ()
    unboxed = nn.unbox(boxed_params)
    assert not any(is_box(x) for x in jax.tree.leaves(unboxed, is_leaf=is_box))
    batch, from_unboxed = reference  # applied to unboxed parameters
    from_boxed = jax.jit(make_model().apply)({"params": boxed_params}, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), from_boxed, from_unboxed)


def test_scanned_parameters_carry_a_leading_layers_axis():
    model = make_model(scan_layers=True)
    batch = random_batch(np.random.default_rng(random_seed()), batch=1)
    boxed = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    assert_fully_annotated(boxed)
    for modality in ("image", "text", "audio"):
        blocks = boxed[modality]["encoder"]["encoder"]["blocks"]
        assert all(leaf.names[0] == "layers" for leaf in jax.tree.leaves(blocks, is_leaf=is_box))
    query = boxed["text"]["encoder"]["encoder"]["blocks"]["attention"]["query"]
    assert query["kernel"].names == ("layers", "embed", "heads", "kv")


def test_annotations_resolve_under_a_mesh():
    """Init and apply trace inside a mesh with logical axis rules, as the sharded train step runs
    them (flax's own attention does not: see transformer.AttentionProjection), and the rules
    split each parameter along its width."""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"))
    model = make_model(scan_layers=True, remat="full")
    batch = random_batch(np.random.default_rng(random_seed()), batch=8)

    @contextlib.contextmanager
    def inside_mesh():
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            yield

    with inside_mesh():
        boxed = jax.eval_shape(model.init, jax.random.key(0), batch)
    params = nn.unbox(boxed)  # outside: unbox itself constrains when a mesh is active
    with inside_mesh():
        outputs = jax.eval_shape(model.apply, params, batch)
    assert outputs["embeddings"]["text"].shape == (8, 8)
    layouts = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
    blocks = layouts["text"]["encoder"]["encoder"]["blocks"]
    assert blocks["attention"]["out"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert blocks["mlp"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def test_bfloat16_compute_keeps_float32_parameters_and_embeddings(boxed_params, reference):
    """bf16 matmuls and convolutions; float32 parameters, softmax, LayerNorm statistics and
    normalised embeddings."""
    batch, outputs = reference
    half = make_model(dtype=jnp.bfloat16)
    half_shapes = jax.eval_shape(half.init, jax.random.key(0), batch)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half_shapes))
    params = {"params": nn.unbox(boxed_params)}
    bf16, f32 = np.dtype(jnp.bfloat16), np.dtype(jnp.float32)
    products = transcendentals = 0
    for eqn in equations(jax.make_jaxpr(half.apply)(params, batch)):
        name, inputs = eqn.primitive.name, dtypes(eqn.invars)
        if name in ("dot_general", "conv_general_dilated"):
            products += 1
            assert inputs == (bf16, bf16), (name, inputs)
        if name in ("exp", "rsqrt", "sqrt"):  # softmax, LayerNorm, embedding norm
            transcendentals += 1
            assert inputs == (f32,), (name, inputs)
    assert products and transcendentals
    embeddings = jax.jit(half.apply)(params, batch)["embeddings"]
    # About 30 bf16 roundings (relative error <= eps/2 each) lie on a path through 2 blocks,
    # the patch embedding, the pooling head and the projection; independent errors grow like
    # sqrt(30) * eps/2 = 2.7 eps. Unit-length float32 embeddings: 4 eps absolute.
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    for modality, expected in outputs["embeddings"].items():
        assert embeddings[modality].dtype == jnp.float32
        np.testing.assert_allclose(embeddings[modality], expected, atol=4 * eps)


def outputs_and_gradients(model, params, batch):
    """The embeddings, and the gradient of a nonlinear scalar of them w.r.t. the parameters."""

    def scalar(params):
        embeddings = model.apply({"params": params}, batch)["embeddings"]
        return sum(jnp.sin(3.0 * e).sum() for e in embeddings.values()), embeddings

    (_, embeddings), grads = jax.jit(jax.value_and_grad(scalar, has_aux=True))(params)
    return embeddings, grads


def stack_blocks(params, depth=2):
    """A tower's looped params -> scanned ones: block0..block{depth-1} stacked on a new axis 0."""
    encoder = dict(params["encoder"]["encoder"])
    blocks = [encoder.pop(f"block{i}") for i in range(depth)]
    encoder["blocks"] = jax.tree.map(lambda *layers: jnp.stack(layers), *blocks)
    return {**params, "encoder": {**params["encoder"], "encoder": encoder}}


def only_text(params):
    return {k: v for k, v in params.items() if k not in ("image", "audio")}


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_keep_outputs_and_gradients(policy, boxed_params):
    """On the text tower (masked attention); the encoder, where remat lives, is shared by all towers."""
    batch = {"text": random_batch(np.random.default_rng(random_seed()), batch=3)["text"]}
    params = only_text(nn.unbox(boxed_params))
    expected = outputs_and_gradients(make_model(["text"]), params, batch)
    got = outputs_and_gradients(make_model(["text"], remat=policy), params, batch)
    assert_trees_close(got, expected, rtol=1e-5, noise=(KEY_BIASES,))


def test_a_block_recomputes_its_layer_norms_and_gelu_instead_of_keeping_them():
    """The default block (no remat policy) against one that keeps everything, applied 4
    times: the same outputs and gradients, and at least GELU's [B, T, mlp] intermediate
    less memory for each application but the last (whose backward pass comes first)."""
    batch, tokens, width, mlp, depth = 16, 64, 64, 256, 4
    x = jnp.asarray(np.random.default_rng(random_seed()).standard_normal((batch, tokens, width)),
                    jnp.float32)

    def value_and_grad(recompute):
        block = EncoderBlock(num_heads=2, mlp_dim=mlp, recompute_elementwise=recompute)

        def loss(params, x):
            for _ in range(depth):
                x, _ = block.apply(params, x, None)
            return jnp.sum(jnp.sin(x))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    params = EncoderBlock(num_heads=2, mlp_dim=mlp).init(jax.random.key(0), x, None)
    kept, recomputed = (value_and_grad(recompute) for recompute in (False, True))
    assert_trees_close(recomputed(params, x), kept(params, x), rtol=1e-5, noise=(KEY_BIASES,))
    temp = {name: fn.lower(params, x).compile().memory_analysis().temp_size_in_bytes
            for name, fn in (("kept", kept), ("recomputed", recomputed))}
    assert temp["kept"] - temp["recomputed"] >= (depth - 1) * batch * tokens * mlp * 4, temp


def test_scanned_layers_match_looped_layers(boxed_params, reference):
    batch, expected = reference
    params = nn.unbox(boxed_params)
    stacked = {k: stack_blocks(v) if k in ("image", "text", "audio") else v for k, v in params.items()}
    scanned = make_model(scan_layers=True)
    scanned_shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), batch)["params"])
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    assert shapes(stacked) == shapes(scanned_shapes)
    assert shapes(stacked["text"]["encoder"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]) == (2, 32, 64)
    assert_trees_close(jax.jit(scanned.apply)({"params": stacked}, batch), expected, rtol=1e-5)


def test_remat_inside_scan_keeps_outputs_and_gradients(boxed_params):
    batch = {"text": random_batch(np.random.default_rng(random_seed()), batch=3)["text"]}
    params = only_text(nn.unbox(boxed_params))
    params["text"] = stack_blocks(params["text"])
    expected = outputs_and_gradients(make_model(["text"], scan_layers=True), params, batch)
    got = outputs_and_gradients(make_model(["text"], scan_layers=True, remat="full"), params, batch)
    assert_trees_close(got, expected, rtol=1e-5, noise=(KEY_BIASES,))


def test_dropout_only_in_training(boxed_params, reference):
    batch, outputs = reference
    apply = jax.jit(make_model(dropout_rate=0.5).apply, static_argnames="deterministic")
    rngs = {"dropout": jax.random.key(2)}
    train = apply({"params": boxed_params}, batch, deterministic=False, rngs=rngs)["embeddings"]
    evaluation = apply({"params": boxed_params}, batch)["embeddings"]
    for modality, expected in outputs["embeddings"].items():
        np.testing.assert_allclose(evaluation[modality], expected, rtol=1e-6)
        assert not np.allclose(train[modality], expected)


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_patch_dropout_keeps_a_random_subset_of_each_images_patches_in_training_only(pool):
    rng = np.random.default_rng(random_seed())
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)  # 16 patches each
    plain = VisionTransformer(4, 8, 0, num_heads=2, mlp_dim=16, pool=pool)  # depth 0: tokens as embedded
    dropping = plain.clone(patch_dropout=0.5)
    params = plain.init(jax.random.key(int(rng.integers(1000))), images)
    every = np.asarray(plain.apply(params, images).tokens)
    np.testing.assert_array_equal(dropping.apply(params, images).tokens, every)  # evaluation: all
    subsets = []
    for seed in (1, 2):
        output = dropping.apply(params, images, deterministic=False, rngs={"dropout": jax.random.key(seed)})
        tokens = np.asarray(output.tokens)
        first = int(pool == "cls")
        assert tokens.shape == (6, first + 8, 8)
        np.testing.assert_array_equal(tokens[:, :first], every[:, :first])  # the class token stays
        for example in range(6):  # each kept token is one of the image's, each once, in order
            matches = [int(np.flatnonzero((every[example, first:] == row).all(axis=1))[0])
                       for row in tokens[example, first:]]
            assert matches == sorted(set(matches))
            subsets.append(tuple(matches))
        if pool == "gap":
            np.testing.assert_allclose(output.pooled, tokens.mean(axis=1), rtol=1e-6)
    assert len(set(subsets)) > 6  # other patches for other images and other draws
    assert vit_module.patch_embedding_flops({"patch_size": 4, "width": 8, "pool": pool,
                                             "patch_dropout": 0.5}, (16, 16))[1] == 8 + (pool == "cls")


@pytest.mark.parametrize(
    "variant, patch, millions",
    [
        ("S/16", 16, 21.7),  # DeiT/timm's 22.0M includes a 0.4M ImageNet head
        ("B/16", 16, 86.0),
        ("L/14", 14, 304.0),
    ],
)
def test_named_vit_sizes_have_published_parameter_counts(variant, patch, millions):
    dims, parsed_patch = sizes.parse_variant(variant)
    assert parsed_patch == patch
    vit = VisionTransformer(patch, pool="cls", **dims)
    shapes = jax.eval_shape(vit.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert count(shapes["params"]) == pytest.approx(millions * 1e6, rel=0.01)


def test_parse_variant():
    assert sizes.parse_variant("So400m/14") == (
        dict(width=1152, depth=27, num_heads=16, mlp_dim=4304),
        14,
    )
    assert sizes.parse_variant("B") == (sizes.VARIANTS["B"], None)
    assert sizes.VARIANTS["g"]["width"] == 1408 and sizes.VARIANTS["G"]["width"] == 1664
    with pytest.raises(ValueError, match="valid sizes: Ti, S, M, B, L, So400m, H, g, G"):
        sizes.parse_variant("XL/16")
    with pytest.raises(ValueError, match="positive integer"):
        sizes.parse_variant("B/sixteen")


def model_config(**model):
    """A `config.model` with an image, a text and an audio tower."""
    dims = dict(variant="", width=32, depth=1, num_heads=2, mlp_dim=64, init_from="",
                projection="linear", projection_bias=False)
    config = dict(
        embed_dim=16,
        max_logit_scale=0.0,
        dropout_rate=0.1,
        init_logit_scale=float(np.log(10.0)),
        init_logit_bias=-10.0,
        compute_dtype="bfloat16",
        remat="dots",
        scan_layers=True,
        image=dict(kind="vit", patch_size=4, pool="gap", frozen=False, **dims),
        text=dict(kind="text", pool="last", causal=False, frozen=True, **dims),
        spectrum=dict(kind="audio", patch_size=(4, 2), pool="map", frozen=False, **dims),
    )
    config.update(model)
    return ml_collections.ConfigDict(config)


def test_resolve_towers_reads_every_tower_and_model_settings():
    config = model_config()
    config.image.variant = "B/16"
    config.text.variant = "S/16"  # a text tower takes the dims and ignores the patch
    resolved = towers.resolve_towers(config, vocab_size=100, max_len=12)
    assert towers.tower_names(config) == list(resolved) == ["image", "spectrum", "text"]
    shared = dict(dropout_rate=0.1, dtype=jnp.bfloat16, remat="dots", scan_layers=True)
    shared.update(projection="linear", projection_bias=False)
    assert resolved["image"] == dict(kind="vit", patch_size=16, pool="gap", **sizes.VARIANTS["B"], **shared)
    assert resolved["text"] == dict(
        kind="text", pool="last", causal=False, vocab_size=100, max_len=12, **sizes.VARIANTS["S"], **shared
    )
    assert resolved["spectrum"] == dict(
        kind="audio", patch_size=(4, 2), width=32, depth=1, num_heads=2, mlp_dim=64, pool="map", **shared
    )


def test_build_model_builds_the_configured_towers():
    """Traced only (eval_shape): bfloat16, remat and scanned layers from the config all fit together."""
    model = towers.build_model(model_config(), vocab_size=50, max_len=10)
    batch = random_batch(np.random.default_rng(random_seed()), batch=2)
    inputs = {"image": batch["image"], "text": batch["text"], "spectrum": batch["audio"]}
    variables = jax.eval_shape(model.init, jax.random.key(0), inputs)
    assert set(variables["params"]) == {"image", "text", "spectrum", "logit_scale", "logit_bias"}
    outputs = jax.eval_shape(model.apply, variables, inputs)
    embeddings = outputs["embeddings"]
    assert {m: e.shape for m, e in embeddings.items()} == {m: (2, 16) for m in inputs}
    assert all(e.dtype == jnp.float32 for e in embeddings.values())
    # Each tower also returns its encoder's tokens [B, T, width], in the compute dtype.
    tokens = outputs["tokens"]
    assert tokens["text"].shape == (2, 10, 32) and tokens["text"].dtype == jnp.bfloat16
    assert all(t.shape[0] == 2 and t.shape[2] == 32 for t in tokens.values()) and set(tokens) == set(inputs)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(compute_dtype="float16"), "compute_dtype"),
        (dict(image=dict(kind="resnet")), "model.image.kind='resnet' is unknown"),
        (dict(image=dict(kind="vit", variant="Q/16")), "valid sizes"),
    ],
)
def test_resolve_towers_rejects_unknown_settings(change, message):
    with pytest.raises(ValueError, match=message):
        towers.resolve_towers(model_config(**change), vocab_size=50, max_len=10)


def test_unknown_remat_policy_is_rejected():
    model = make_model(["text"], remat="everything")
    with pytest.raises(ValueError, match="dots_no_batch"):
        jax.eval_shape(model.init, jax.random.key(0), {"text": jnp.ones((1, 10), jnp.int32)})
