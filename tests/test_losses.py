"""Tests for bigalign.losses against float64 NumPy references written from the formulas."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import helpers
from bigalign import losses

# (B, D, scale, bias, tile_size): tile_size subdivides the per-device block.
CASES = [
    (8, 4, 1.0, 0.0, None),
    (32, 16, 10.0, -3.0, None),
    (64, 8, 30.0, -10.0, 4),
]
MESHES = {
    "none": lambda: None,
    "data8": lambda: jax.make_mesh((8,), ("data",)),
    "data4_fsdp2": lambda: jax.make_mesh((4, 2), ("data", "fsdp")),
    "data8_auto": lambda: jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)),
}

# ---------------------------------------------------------------------------
# Float64 NumPy references
# ---------------------------------------------------------------------------


def _log_sigmoid(u):
    return -np.logaddexp(0.0, -u)


def _logsumexp(a, axis):
    peak = a.max(axis=axis, keepdims=True)
    return (peak + np.log(np.exp(a - peak).sum(axis=axis, keepdims=True))).squeeze(axis)


def reference(name, x, y, scale, bias):
    """Loss and its gradients (x, y, scale, bias), derived by hand from the formula."""
    batch = len(x)
    dots = x @ y.T  # [B, B]
    logits = scale * dots + bias
    eye = np.eye(batch)
    if name.startswith("softmax"):
        row_lse, col_lse = _logsumexp(logits, 1), _logsumexp(logits, 0)
        diag = np.diag(logits)
        loss = 0.5 * (np.mean(row_lse - diag) + np.mean(col_lse - diag))
        row_softmax = np.exp(logits - row_lse[:, None])
        col_softmax = np.exp(logits - col_lse[None, :])
        grad_logits = (row_softmax + col_softmax - 2 * eye) / (2 * batch)
    else:
        signs = 2 * eye - 1
        loss = -_log_sigmoid(signs * logits).sum() / batch
        grad_logits = -signs * np.exp(_log_sigmoid(-signs * logits)) / batch
    grads = (
        scale * grad_logits @ y,
        scale * grad_logits.T @ x,
        np.sum(grad_logits * dots),
        np.sum(grad_logits),
    )
    return loss, grads


def random_pair(batch, dim, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(2, batch, dim))
    return (
        x / np.linalg.norm(x, axis=1, keepdims=True),
        y / np.linalg.norm(y, axis=1, keepdims=True),
    )


def on_mesh(array, mesh):
    if mesh is None:
        return jnp.asarray(array, jnp.float32)
    return jax.device_put(jnp.asarray(array, jnp.float32), NamedSharding(mesh, P("data", None)))


def assert_close(actual, expected, atol=1e-6, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# The references themselves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_reference_gradients_match_finite_differences(name):
    x, y = random_pair(6, 3, helpers.random_seed())
    scale, bias = 4.0, -1.5
    _, grads = reference(name, x, y, scale, bias)
    step = 1e-6

    def numeric(loss_of):
        return (loss_of(step) - loss_of(-step)) / (2 * step)

    def loss(x=x, y=y, scale=scale, bias=bias):
        return reference(name, x, y, scale, bias)[0]

    for i, j in [(0, 0), (3, 2), (5, 1)]:
        delta = np.zeros_like(x)
        delta[i, j] = 1
        assert numeric(lambda h: loss(x=x + h * delta)) == pytest.approx(grads[0][i, j], abs=1e-7)
        assert numeric(lambda h: loss(y=y + h * delta)) == pytest.approx(grads[1][i, j], abs=1e-7)
    assert numeric(lambda h: loss(scale=scale + h)) == pytest.approx(grads[2], abs=1e-7)
    assert numeric(lambda h: loss(bias=bias + h)) == pytest.approx(grads[3], abs=1e-7)


# ---------------------------------------------------------------------------
# Every variant against the reference
# ---------------------------------------------------------------------------


def _value_and_grads(name, mesh, tile_size):
    def loss(x, y, scale, bias):
        return losses.compute(name, x, y, scale=scale, bias=bias, mesh=mesh, tile_size=tile_size)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


@pytest.mark.parametrize("mesh_kind", list(MESHES))
@pytest.mark.parametrize("name", losses.NAMES)
def test_matches_reference_under_jit(name, mesh_kind):
    mesh = MESHES[mesh_kind]()
    for batch, dim, scale, bias, tile_size in CASES:
        tile_size = tile_size if name in ("softmax_tiled", "sigmoid_chunked") else None
        x, y = random_pair(batch, dim, helpers.random_seed())
        expected_loss, expected_grads = reference(name, x, y, scale, bias)
        step = jax.jit(_value_and_grads(name, mesh, tile_size))
        loss, grads = step(
            on_mesh(x, mesh), on_mesh(y, mesh), jnp.float32(scale), jnp.float32(bias)
        )
        assert loss.dtype == jnp.float32
        assert_close(loss, expected_loss)
        for actual, expected in zip(grads, expected_grads):
            assert_close(actual, expected)
        if mesh is not None:  # gradients stay sharded like the embeddings
            for grad in grads[:2]:
                assert grad.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)


@pytest.mark.parametrize("mesh_kind", ["none", "data8"])
@pytest.mark.parametrize("name", losses.NAMES)
def test_batches_of_several_tiles_or_without_a_good_tile_match_reference(name, mesh_kind):
    """B = 768: the all-gather variants loop over three 256-column tiles (CASES fit in
    one). B = 8 x 257: no divisor near the default tile, so the columns come whole."""
    mesh = MESHES[mesh_kind]()
    for batch in (768, 8 * 257):
        x, y = random_pair(batch, 4, helpers.random_seed())
        expected_loss, expected_grads = reference(name, x, y, 10.0, -3.0)
        loss, grads = jax.jit(_value_and_grads(name, mesh, None))(
            on_mesh(x, mesh), on_mesh(y, mesh), jnp.float32(10.0), jnp.float32(-3.0))
        assert_close(loss, expected_loss)
        for actual, expected in zip(grads, expected_grads):
            assert_close(actual, expected)


def test_default_tiles_divide_the_batch_and_are_never_narrow():
    for batch in range(1, 3000):
        tile = losses.pick_tile(batch, None)
        assert batch % tile == 0 and (tile == batch or 4 * tile >= losses.DEFAULT_TILE), batch
    assert losses.pick_tile(8192, None) == 256 and losses.pick_tile(1000, None) == 250
    assert losses.pick_tile(8 * 257, None) == 8 * 257


@pytest.mark.parametrize("name", losses.NAMES)
def test_matches_reference_eagerly(name):
    x, y = random_pair(16, 8, helpers.random_seed())
    expected_loss, expected_grads = reference(name, x, y, 5.0, -2.0)
    for mesh in (None, MESHES["data8"]()):
        # Eager grad on an Explicit mesh needs the mesh context (a JAX requirement).
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            loss, grads = _value_and_grads(name, mesh, None)(
                on_mesh(x, mesh), on_mesh(y, mesh), jnp.float32(5.0), jnp.float32(-2.0)
            )
        assert_close(loss, expected_loss)
        for actual, expected in zip(grads, expected_grads):
            assert_close(actual, expected)


@pytest.mark.parametrize("mesh_kind", ["none", "data8"])
@pytest.mark.parametrize("name", losses.NAMES)
def test_logits_far_beyond_exp_range_stay_finite_and_match_reference(name, mesh_kind):
    """Logits of +-1000 (e^1000 overflows float32): every reduction must stay in its stable
    form. float32 logits of that size carry errors of ~1e-4, hence the looser tolerances
    (softmax's bias gradient is 0, so the floor is absolute)."""
    mesh = MESHES[mesh_kind]()
    x, y = random_pair(64, 8, helpers.random_seed())
    expected_loss, expected_grads = reference(name, x, y, 1000.0, 5.0)
    loss, grads = jax.jit(_value_and_grads(name, mesh, None))(
        on_mesh(x, mesh), on_mesh(y, mesh), jnp.float32(1000.0), jnp.float32(5.0))
    assert_close(loss, expected_loss, atol=1e-3, rtol=1e-3)
    for actual, expected in zip(grads, expected_grads):
        assert_close(actual, expected, atol=1e-3 * max(1.0, np.abs(expected).max()), rtol=1e-3)


@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_chunked"])
def test_sigmoid_bias_none_means_zero(name):
    x, y = random_pair(16, 8, helpers.random_seed())
    expected_loss, _ = reference(name, x, y, 7.0, 0.0)
    assert_close(losses.compute(name, jnp.asarray(x), jnp.asarray(y), scale=7.0), expected_loss)


@pytest.mark.parametrize("mesh_kind", ["none", "data4_fsdp2"])
@pytest.mark.parametrize("name", losses.NAMES)
def test_bfloat16_inputs_compute_in_float32(name, mesh_kind):
    """bf16 embeddings are upcast before any other op: everything after the casts is float32,
    and the result is that of the bf16-rounded inputs in float32, gradients rounded to bf16."""
    mesh = MESHES[mesh_kind]()
    x, y = random_pair(16, 8, helpers.random_seed())
    x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    if mesh is not None:
        x16, y16 = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in (x16, y16))
    step = jax.value_and_grad(
        lambda x, y: losses.compute(name, x, y, scale=10.0, bias=-5.0, mesh=mesh), argnums=(0, 1)
    )
    bf16, f32 = np.dtype(jnp.bfloat16), np.dtype(jnp.float32)
    products = 0
    for eqn in helpers.equations(jax.make_jaxpr(step)(x16, y16)):
        touched = helpers.dtypes(eqn.invars) + helpers.dtypes(eqn.outvars)
        if eqn.primitive.name != "convert_element_type":
            assert bf16 not in touched, (eqn.primitive.name, touched)
        if eqn.primitive.name == "dot_general":
            products += 1
            assert helpers.dtypes(eqn.invars) == (f32, f32)
    assert products
    loss, grads = jax.jit(step)(x16, y16)
    rounded = [np.asarray(a, np.float64) for a in (x16, y16)]
    expected_loss, expected_grads = reference(name, *rounded, 10.0, -5.0)
    assert loss.dtype == jnp.float32
    assert_close(loss, expected_loss)
    # One rounding of a float32 gradient to bf16: relative error at most eps/2.
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    for grad, expected in zip(grads, expected_grads[:2]):
        assert grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=eps / 2,
                                   atol=1e-6 * np.abs(expected).max())


def test_lean_variants_use_less_memory():
    """README: at B = 16384 (D = 512, 8 devices; docs/benchmarks.md) the ring variants need
    1/11 of the all-gather ones' temp memory (softmax and sigmoid). Compiled, not run."""
    mesh = MESHES["data8"]()
    x = jax.ShapeDtypeStruct((16384, 512), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)

    def temp_bytes(name):
        step = jax.jit(_value_and_grads(name, mesh, None))
        compiled = step.lower(x, x, scalar, scalar).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    for lean, gathered, claimed in [("softmax_tiled", "softmax", 11), ("sigmoid_chunked", "sigmoid", 11)]:
        ratio = temp_bytes(gathered) / temp_bytes(lean)
        assert ratio >= 0.75 * claimed, (lean, ratio)


# ---------------------------------------------------------------------------
# Alignment and uniformity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1, 2])
def test_alignment(alpha):
    x, y = random_pair(32, 8, helpers.random_seed())
    expected = np.mean(np.linalg.norm(x - y, axis=1) ** alpha)
    assert_close(losses.alignment(jnp.asarray(x), jnp.asarray(y), alpha), expected)
    mesh = MESHES["data8"]()
    aligned = jax.jit(lambda a, b: losses.alignment(a, b, alpha, mesh=mesh))
    value = aligned(on_mesh(x, mesh), on_mesh(y, mesh))
    assert_close(value, expected)


@pytest.mark.parametrize("mesh_kind", list(MESHES))
def test_uniformity(mesh_kind):
    mesh = MESHES[mesh_kind]()
    x, _ = random_pair(32, 8, helpers.random_seed())
    sq_dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # [B, B]
    off_diagonal = ~np.eye(len(x), dtype=bool)
    for t in (2.0, 0.5):
        expected = np.log(np.mean(np.exp(-t * sq_dist[off_diagonal])))
        value = jax.jit(lambda a: losses.uniformity(a, t, mesh=mesh))(on_mesh(x, mesh))
        assert_close(value, expected)


# ---------------------------------------------------------------------------
# Bad calls
# ---------------------------------------------------------------------------


def test_bad_calls_raise_value_errors():
    mesh = MESHES["data8"]()
    x = jnp.zeros((16, 4))
    valid = "softmax, softmax_tiled, sigmoid, sigmoid_chunked"
    with pytest.raises(ValueError, match=f"unknown loss 'infonce'; valid names are {valid}"):
        losses.compute("infonce", x, x, scale=1.0)
    not_divisible = "batch size 12 is not divisible by mesh axis 'data' of size 8.*multiple of 8"
    with pytest.raises(ValueError, match=not_divisible):
        losses.compute("softmax", jnp.zeros((12, 4)), jnp.zeros((12, 4)), scale=1.0, mesh=mesh)
    with pytest.raises(ValueError, match=r"same shape; got x \(16, 4\) and y \(16, 5\)"):
        losses.compute("sigmoid", x, jnp.zeros((16, 5)), scale=1.0)
    with pytest.raises(ValueError, match=r"2-D \[batch, dim\]"):
        losses.compute("sigmoid", jnp.zeros((16,)), jnp.zeros((16,)), scale=1.0)
    with pytest.raises(ValueError, match="axis 'model' is not a mesh axis"):
        losses.compute("softmax", x, x, scale=1.0, mesh=mesh, axis="model")
    with pytest.raises(ValueError, match="tile_size 3 must be a positive divisor of .* batch 2"):
        losses.compute("softmax_tiled", x, x, scale=1.0, mesh=mesh, tile_size=3)
    with pytest.raises(ValueError, match="scale and bias must be scalars"):
        losses.compute("softmax", x, x, scale=jnp.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        losses.alignment(x, jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="2-D"):
        losses.uniformity(jnp.zeros((4, 2, 2)))
