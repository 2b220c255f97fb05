"""GradCache: exact large-batch contrastive gradients, holding one chunk's activations at a time.

A contrastive loss couples every example with every other one in the global batch,
so plain gradient accumulation (summing per-chunk losses) changes the loss: each
chunk would only see its own negatives. GradCache (Gao et al., 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") splits the step at the
embeddings, which are small ([B, E]) compared with the towers' activations:

1. Embed: run the towers chunk by chunk, forward only, keeping just the embeddings.
2. Loss: compute the loss on the full global batch of embeddings and its gradient
   with respect to the embeddings (the "cached" gradient) and to the logit scale
   and bias.
3. Backward: per chunk, run the towers again under ``jax.vjp`` and pull that
   chunk's embedding cotangents back to the parameters, summing over chunks in a
   ``lax.scan`` so that only one chunk's activations are live at a time.

The result is the same (loss, gradients) as differentiating the whole batch at once,
for one extra forward pass, with tower activation memory divided by ``num_chunks``.

Sharding: the batch is a global array whose rows are split contiguously over the
mesh axes ``axis`` (the trainer's data x fsdp; D devices, b = B / D rows each). A
chunk is not a contiguous slice of the global batch (that would live on D / n of the
devices and leave the rest idle): chunk k takes rows [k c, (k + 1) c) of every device's block, c = b / n,
so every device works on every chunk and rows never leave their device. The layout
is set with sharding constraints, for the Auto mesh axes that ``sharding.make_mesh``
builds. Cost: each chunk's parameter gradients are summed over devices inside the
loop, so the gradient all-reduce runs ``num_chunks`` times per step.

Dropout: chunk k draws its dropout masks from ``fold_in(rng, k)`` in both passes, so
the recomputation in pass 3 is exact. The masks differ from those of an unchunked
forward (Flax draws a mask per call, not per example), which is an equally valid
sample; with dropout off the result matches the plain step up to float rounding.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _num_devices(mesh: Mesh, axis) -> int:
    """Devices the batch is split over: the size of one mesh axis or of a tuple of them."""
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[name] for name in names)


def to_chunks(tree, num_chunks: int, mesh: Mesh, axis="data"):
    """[B, ...] leaves -> [n, B / n, ...]; chunk k: rows [k c, (k + 1) c) of each device's block."""
    devices = _num_devices(mesh, axis)

    def split(x):
        rows = x.shape[0] // (devices * num_chunks)  # c = b / n
        x = x.reshape(devices, num_chunks, rows, *x.shape[1:])  # [D, n, c, ...]
        x = jnp.swapaxes(x, 0, 1)  # [n, D, c, ...]
        x = x.reshape(num_chunks, devices * rows, *x.shape[3:])  # [n, D c, ...]
        return lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, axis)))

    return jax.tree.map(split, tree)


def from_chunks(tree, mesh: Mesh, axis="data"):
    """The inverse of ``to_chunks``: [n, B / n, ...] leaves -> [B, ...] in the batch's row order."""
    devices = _num_devices(mesh, axis)

    def merge(x):
        num_chunks, chunk = x.shape[:2]  # n, D c
        x = x.reshape(num_chunks, devices, chunk // devices, *x.shape[2:])  # [n, D, c, ...]
        x = jnp.swapaxes(x, 0, 1)  # [D, n, c, ...]
        x = x.reshape(num_chunks * chunk, *x.shape[3:])  # [B, ...]
        return lax.with_sharding_constraint(x, NamedSharding(mesh, P(axis)))

    return jax.tree.map(merge, tree)


def value_and_grad(
    apply: Callable[..., dict],
    loss_of_outputs: Callable[[dict, dict], tuple[jax.Array, Any]],
    *,
    mesh: Mesh,
    num_chunks: int,
    axis="data",
) -> Callable[[Any, dict, jax.Array], tuple[tuple[jax.Array, Any], Any]]:
    """GradCache version of ``jax.value_and_grad(loss_fn, has_aux=True)``.

    ``apply(params, inputs, *, deterministic, rngs)`` runs a ``ContrastiveModel``
    (which embeds only the modalities it is given, so ``apply(params, {}, ...)``
    yields just the logit scale and bias). ``loss_of_outputs(outputs, batch)`` maps the
    model's outputs {"embeddings": {modality: [B, E]}, "logit_scale", "logit_bias"} for
    the global batch (no token outputs: only embeddings are cached), and the batch, to
    (scalar loss, aux). ``axis`` is the mesh axis, or tuple of axes,
    that the batch is split over.
    Returns ``fn(params, batch, rng) -> ((loss, aux), grads)``.
    """

    def embed(params, inputs, chunk_index, rng):  # {modality: [B/n, ...]} -> {modality: [B/n, E]}
        outputs = apply(
            params,
            inputs,
            deterministic=False,
            rngs={"dropout": jax.random.fold_in(rng, chunk_index)},  # the same in passes 1 and 3
        )
        return outputs["embeddings"]

    def loss_of_embeddings(params, embeddings, batch):  # {modality: [B, E]} -> (scalar, aux)
        head = apply(params, {}, deterministic=True, rngs={})  # logit scale and bias only
        del head["tokens"]  # empty: no modality was run
        return loss_of_outputs(dict(head, embeddings=embeddings), batch)

    def step(params, batch, rng):
        chunks = to_chunks(batch, num_chunks, mesh, axis)  # {modality: [n, B/n, ...]}
        indices = jnp.arange(num_chunks)

        # 1. Embed chunk by chunk; nothing here is differentiated, so no activations are kept.
        chunk_embeddings = lax.map(
            lambda xs: embed(params, xs[0], xs[1], rng), (chunks, indices)
        )  # {modality: [n, B/n, E]}
        # The inverse permutation restores the batch's row order and layout: row i of every
        # modality still pairs with row i of the others, and each device holds its own rows,
        # so the loss sees exactly what the plain step gives it (no resharding).
        embeddings = lax.stop_gradient(from_chunks(chunk_embeddings, mesh, axis))  # {m: [B, E]}

        # 2. The loss on the global batch; gradients w.r.t. embeddings and the head params
        # (logit scale and bias; the towers' entries of head_grads are zero).
        (loss, aux), (head_grads, embedding_grads) = jax.value_and_grad(
            loss_of_embeddings, argnums=(0, 1), has_aux=True
        )(params, embeddings, batch)
        embedding_grads = to_chunks(embedding_grads, num_chunks, mesh, axis)  # {m: [n, B/n, E]}

        # 3. Recompute each chunk's forward and pull its cached embedding gradient back.
        def accumulate(grads, xs):
            inputs, chunk_index, cotangent = xs
            _, pullback = jax.vjp(lambda p: embed(p, inputs, chunk_index, rng), params)
            (chunk_grads,) = pullback(cotangent)
            return jax.tree.map(jnp.add, grads, chunk_grads), None

        grads, _ = lax.scan(accumulate, head_grads, (chunks, indices, embedding_grads))
        return (loss, aux), grads

    return step
