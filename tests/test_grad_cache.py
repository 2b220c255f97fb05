"""GradCache: chunked embedding and cached embedding gradients give the plain loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bigalign
from bigalign import config as config_lib, grad_cache, sharding, step
from bigalign.errors import UserError
from helpers import KEY_BIASES, assert_trees_close, random_global_batch, random_seed, setup as build_on_mesh


NUM_CHUNKS = 4
_initial_states = {}  # data shards -> TrainState, shared by the tests here


@pytest.fixture
def config(tiny_config):
    tiny_config.batch_size = 32  # 4 rows per device on 8 devices: 4 chunks of 1 row each
    return tiny_config


def test_chunks_take_rows_from_every_device_and_invert():
    mesh_config = config_lib.base_config().mesh
    mesh_config.fsdp = 2  # a (4, 2) mesh: the batch is split over both axes
    mesh = sharding.make_mesh(mesh_config)  # 8 devices, b = 4 rows each
    axes = sharding.BATCH_AXES
    rows = jax.device_put(jnp.arange(32), sharding.batch_sharding(mesh))
    chunks = jax.jit(lambda x: grad_cache.to_chunks(x, 2, mesh, axes))(rows)  # [2, 16]
    # Chunk k holds rows [2k, 2k + 2) of every device's block of 4.
    expected = np.arange(32).reshape(8, 2, 2).transpose(1, 0, 2).reshape(2, 16)
    np.testing.assert_array_equal(chunks, expected)
    for shard in chunks.addressable_shards:  # each device keeps its own rows
        device_index = mesh.devices.flatten().tolist().index(shard.device)
        own_rows = set(range(4 * device_index, 4 * device_index + 4))
        assert set(np.asarray(shard.data).ravel()) <= own_rows
    back = jax.jit(lambda x: grad_cache.from_chunks(x, mesh, axes))(chunks)
    np.testing.assert_array_equal(back, np.arange(32))


@pytest.mark.parametrize(
    "loss_name, shards", [("sigmoid", 8), ("softmax", 8), ("sigmoid", 1)]
)
def test_loss_and_gradients_match_plain_autodiff(config, loss_name, shards):
    config.loss.name = loss_name
    run, state = build_on_mesh(config, shards, state_cache=_initial_states)
    mesh, model = run.mesh, run.model
    batch = random_global_batch(run, np.random.default_rng(random_seed()))
    config.grad_cache.num_chunks = NUM_CHUNKS
    config_lib.validate(config)

    loss_fn = step.make_loss_fn(config, model, mesh)
    plain = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    cached = jax.jit(step.make_value_and_grad(config, model, mesh))
    (loss, metrics), grads = plain(state.params, batch, state.rng)
    (cached_loss, cached_metrics), cached_grads = cached(state.params, batch, state.rng)

    np.testing.assert_allclose(cached_loss, loss, rtol=1e-4)
    assert_trees_close(cached_metrics, metrics, rtol=1e-4)  # logit scale, bias, pair losses
    noise = (KEY_BIASES, "['logit_bias']") if loss_name == "softmax" else (KEY_BIASES,)
    assert_trees_close(cached_grads, grads, rtol=1e-4, noise=noise)


@pytest.mark.parametrize("masking", ["dropout_rate", "image.patch_dropout"])
def test_dropout_is_replayed_exactly_in_the_recomputation(config, masking):
    """With dropout (or patch dropout) on, the result equals autodiff through the same
    chunked forward (same masks)."""
    if masking == "dropout_rate":
        config.model.dropout_rate = 0.3
    else:
        config.model.image.patch_dropout = 0.5
    run, state = build_on_mesh(config, 8, state_cache=_initial_states)
    mesh, model = run.mesh, run.model
    batch = random_global_batch(run, np.random.default_rng(random_seed()))
    output_loss = step.make_output_loss(config, mesh)

    def chunked_loss(params, batch, rng):  # the reference: autodiff through the chunked forward
        def embed(xs):
            inputs, k = xs
            rngs = {"dropout": jax.random.fold_in(rng, k)}
            return model.apply({"params": params}, inputs, deterministic=False, rngs=rngs)
        chunks = grad_cache.to_chunks(batch, NUM_CHUNKS, mesh)
        chunk_outputs = lax.map(embed, (chunks, jnp.arange(NUM_CHUNKS)))
        embeddings = grad_cache.from_chunks(chunk_outputs["embeddings"], mesh)
        head = model.apply({"params": params}, {})
        return output_loss(dict(head, embeddings=embeddings), batch)[0]

    def reference(params, batch, rng):
        without_dropout, _ = output_loss(model.apply({"params": params}, batch), batch)
        return jax.value_and_grad(chunked_loss)(params, batch, rng), without_dropout

    (loss, grads), loss_without_dropout = jax.jit(reference)(state.params, batch, state.rng)
    def apply(params, inputs, **kwargs):
        return model.apply({"params": params}, inputs, **kwargs)

    cached = jax.jit(
        grad_cache.value_and_grad(apply, output_loss, mesh=mesh, num_chunks=NUM_CHUNKS)
    )
    (cached_loss, _), cached_grads = cached(state.params, batch, state.rng)
    assert abs(float(loss_without_dropout) - float(loss)) > 1e-4  # dropout is active
    np.testing.assert_allclose(cached_loss, loss, rtol=1e-4)
    assert_trees_close(cached_grads, grads, rtol=1e-4, noise=(KEY_BIASES,))


def test_train_step_with_grad_cache_matches_the_plain_step(config):
    config.optimizer.warmup_steps = 0  # a nonzero learning rate at step 0
    run, state = build_on_mesh(config, 8, state_cache=_initial_states)
    batch = random_global_batch(run, np.random.default_rng(random_seed()))
    results = []
    for num_chunks in (1, NUM_CHUNKS):
        config.grad_cache.num_chunks = num_chunks
        train_step = bigalign.build(config).train_step
        results.append(train_step(jax.tree.map(jnp.copy, state), batch))  # the step donates its state
    (plain_state, plain_metrics), (cached_state, cached_metrics) = results
    assert cached_metrics.keys() == plain_metrics.keys()
    np.testing.assert_allclose(cached_metrics["train/loss"], plain_metrics["train/loss"], rtol=1e-4)
    np.testing.assert_allclose(
        cached_metrics["train/grad_norm"], plain_metrics["train/grad_norm"], rtol=1e-4
    )
    assert int(cached_state.step) == 1
    # Attention key biases have a gradient of exactly 0 in exact math (softmax ignores a shift
    # common to all keys) but float32 noise in practice, and Adam's first step is about
    # lr * sign(gradient): those move by up to lr either way in both steps.
    learning_rate = float(plain_metrics["train/learning_rate"])
    assert learning_rate > 0
    slack = 1e-5 * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(plain_state.params))
    for (path, cached_param), plain_param in zip(
        jax.tree_util.tree_leaves_with_path(cached_state.params),
        jax.tree.leaves(plain_state.params),
    ):
        is_key_bias = "'key']['bias']" in jax.tree_util.keystr(path)
        atol = 2 * learning_rate if is_key_bias else slack
        np.testing.assert_allclose(cached_param, plain_param, rtol=1e-4, atol=atol)


def test_validation_names_num_chunks_and_the_fix():
    config = config_lib.base_config()  # batch 256 over 8 shards: 32 rows per device
    config.grad_cache.num_chunks = 3
    config_lib.validate(config)  # the per-device batch is known once the devices are
    with pytest.raises(UserError, match=r"grad_cache.num_chunks=3 must be a positive divisor of "
                                        r"the per-device batch 32 .*pick a divisor of 32"):
        bigalign.build(config)
    config.mesh.data = 8  # ... or when the mesh size is given
    with pytest.raises(UserError, match=r"grad_cache.num_chunks=3 must be a positive divisor"):
        config_lib.validate(config)
    config.grad_cache.num_chunks = 0
    with pytest.raises(UserError, match="grad_cache.num_chunks=0"):
        config_lib.validate(config)
    config.grad_cache.num_chunks = 8
    bigalign.build(config)
