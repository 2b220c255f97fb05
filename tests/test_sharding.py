"""The (data, fsdp) mesh: every mesh shape computes what one device computes, with parameters split."""

import jax
import numpy as np
import optax
import pytest

import bigalign
from bigalign import config as config_lib, sharding, step
from bigalign.errors import UserError
from helpers import KEY_BIASES, assert_trees_close, random_global_batch, random_seed, setup

MESH_SHAPES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def build(config, mesh_shape):
    config.mesh.data, config.mesh.fsdp = mesh_shape
    return bigalign.build(config)


def embeddings_loss_and_grads(run, state, batch):
    """(embeddings, loss, gradients) of one batch, jitted on the run's mesh."""
    config, mesh, model = run.config, run.mesh, run.model
    value_and_grad = step.make_value_and_grad(config, model, mesh)

    def run(params, batch):
        with sharding.logical_rules(mesh):
            embeddings = model.apply({"params": params}, batch)["embeddings"]
        (loss, _), grads = value_and_grad(params, batch, state.rng)
        return embeddings, loss, grads

    return jax.jit(run)(state.params, sharding.global_batch(batch, mesh))


@pytest.fixture(scope="module")
def reference(request):
    """A config, batch, single-device state and its results, shared by the mesh shapes."""
    from conftest import make_tiny_config

    config = make_tiny_config()
    config.model.image.pool = "map"  # the attention-pooling probe and head get sharded too
    run = build(config, (1, 1))
    batch = run.random_batch(np.random.default_rng(random_seed()))
    state = run.init_state()
    return config, batch, state, embeddings_loss_and_grads(run, state, batch)


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_every_mesh_shape_matches_one_device(reference, mesh_shape):
    config, batch, single_state, (embeddings1, loss1, grads1) = reference
    run = build(config, mesh_shape)
    state = jax.device_put(single_state, run.state_sharding)
    embeddings, loss, grads = embeddings_loss_and_grads(run, state, batch)
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    for modality in embeddings1:
        np.testing.assert_allclose(embeddings[modality], embeddings1[modality], rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads1, rtol=1e-5, noise=(KEY_BIASES,))


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_parameters_and_optimizer_moments_are_split_over_fsdp(tiny_config, mesh_shape):
    run, state = setup(tiny_config, *mesh_shape)
    fsdp = mesh_shape[1]
    matrices = [  # every weight matrix has a model-width dimension, split over fsdp
        x for path, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state))
        if x.ndim >= 2 and "bias" not in jax.tree_util.keystr(path)  # q/k/v biases: [heads, kv]
    ]
    assert len(matrices) > 20
    for array in matrices:
        for shard in array.addressable_shards:
            assert shard.data.size == array.size // fsdp, (array.shape, shard.data.shape)
    # A train step keeps the layout (parameters are not gathered for good).
    new_state, _ = run.train_step(state, random_global_batch(run, np.random.default_rng(random_seed())))
    for path, array in jax.tree_util.tree_leaves_with_path(new_state.params):
        if array.ndim >= 2 and "bias" not in jax.tree_util.keystr(path):
            assert array.addressable_shards[0].data.size == array.size // fsdp


def test_batch_is_split_over_data_and_fsdp(tiny_config):
    batch = random_global_batch(build(tiny_config, (2, 4)), np.random.default_rng(random_seed()))
    for array in batch.values():
        rows = {tuple(range(*s.index[0].indices(len(array)))) for s in array.addressable_shards}
        assert len(rows) == 8  # 8 distinct row blocks, one per device


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(data=3, fsdp=1), "mesh.data=3 x mesh.fsdp=1 does not fit the 8 devices"),
        (dict(data=-1, fsdp=16), "mesh.fsdp=16 does not divide the 8 devices"),
        (dict(data=4, fsdp=4), "mesh.data=4 x mesh.fsdp=4 does not fit the 8 devices"),
    ],
)
def test_mesh_that_does_not_fit_is_a_one_line_error(tiny_config, mesh, message):
    tiny_config.batch_size = 48  # divisible by each mesh's shards: the devices are the problem
    tiny_config.mesh.update(mesh)
    with pytest.raises(UserError, match=message):
        bigalign.build(tiny_config)


def test_a_pod_config_validates_without_its_devices(tiny_config):
    """Validation reads the config alone: 64 x 4 devices validate on this 8-device machine;
    the mesh check comes when the run is built on it."""
    tiny_config.mesh.update(data=64, fsdp=4)
    tiny_config.batch_size = 1024
    config_lib.validate(tiny_config)
    with pytest.raises(UserError, match="mesh.data=64 x mesh.fsdp=4 does not fit the 8 devices"):
        bigalign.build(tiny_config)
    tiny_config.batch_size = 1000  # 1000 is not a multiple of 256 shards: known without devices
    with pytest.raises(UserError, match="batch_size=1000 is not divisible by the 256 data shards"):
        config_lib.validate(tiny_config)


def test_width_not_divisible_by_fsdp_is_a_one_line_error(tiny_config):
    tiny_config.model.text.update(width=36, num_heads=2)
    tiny_config.mesh.fsdp = 8
    with pytest.raises(UserError, match=r"model.text.width=36 is not divisible by mesh.fsdp=8"):
        config_lib.validate(tiny_config)


def test_bf16_remat_scan_on_a_2d_mesh_trains(tiny_config):
    tiny_config.model.update(compute_dtype="bfloat16", remat="full", scan_layers=True)
    tiny_config.optimizer.warmup_steps = 0
    run, state = setup(tiny_config, 2, 4)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))  # master weights
    batch = random_global_batch(run, np.random.default_rng(random_seed()))
    losses = []
    for _ in range(6):
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


RING_LOSSES = {"softmax_tiled": "softmax", "sigmoid_chunked": "sigmoid"}  # ring -> all-gather
_ring_states = {}  # mesh shape -> initial TrainState, shared by the ring-loss tests


def one_train_step(config, loss_name, mesh_shape, batch_seed):
    """(loss, grad norm, Adam's first moment) after one real train step from the initial state.

    After one step the first moment is (1 - b1) x the clipped gradient: the gradients, as the
    step computed them.
    """
    config.loss.name = loss_name
    run, state = setup(config, *mesh_shape, state_cache=_ring_states)
    state, metrics = run.train_step(state, random_global_batch(run, np.random.default_rng(batch_seed)))
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)]
    return jax.device_get((metrics["train/loss"], metrics["train/grad_norm"], adam.mu))


@pytest.mark.parametrize("ring", list(RING_LOSSES))
def test_ring_losses_over_data_and_fsdp_match_all_gather_and_one_device(tiny_config, ring):
    """The ring losses pass embeddings around both batch axes, ("data", "fsdp"), in the
    train step, and match the all-gather loss on one device (test_losses.py checks
    every variant on meshes against a NumPy reference)."""
    gathered, seed = RING_LOSSES[ring], random_seed()
    noise = (KEY_BIASES, "['logit_bias']") if gathered == "softmax" else (KEY_BIASES,)
    single = one_train_step(tiny_config, gathered, (1, 1), seed)
    for mesh_shape in [(4, 2), (2, 4)]:
        loss, grad_norm, moments = one_train_step(tiny_config, ring, mesh_shape, seed)
        np.testing.assert_allclose(loss, single[0], rtol=1e-5, err_msg=str(mesh_shape))
        np.testing.assert_allclose(grad_norm, single[1], rtol=1e-5, err_msg=str(mesh_shape))
        assert_trees_close(moments, single[2], rtol=1e-5, noise=noise)
