"""Contrastive losses over a global batch that is sharded across devices.

All variants take L2-normalised embeddings ``x``, ``y`` of shape [B, D] where row i
of ``x`` pairs with row i of ``y``, and score every pair with the logits

    s_ij = scale * <x_i, y_j> + bias            (bias defaults to 0)

so the positives sit on the diagonal of a [B, B] matrix. The batch is sharded over
``axis``: one mesh axis or a tuple of them, e.g. ("data", "fsdp") (n devices in all,
local block b = B / n rows each); other mesh axes only replicate the work. With ``mesh=None`` the same math runs on one device.

Variants (``NAMES``), with what each device must hold at once:

- ``"softmax"``: CLIP symmetric InfoNCE,
  L = 1/2 [ mean_i CE(row i, target i) + mean_j CE(column j, target j) ].
  All-gathers y ([B, D]) and builds its [b, B] rows of the logits once: their
  row log-sum-exps are its rows' terms, and their column log-sum-exps, combined
  over devices ([B] floats each), give every column's term, so no logit is formed
  twice. It forms them a [b, tile] tile at a time and keeps the tiles' products for
  its custom VJP (below). Autodiff through ``all_gather`` gives every device the
  gradient of the global loss (unlike a local loss without gathered gradients).
  Memory O(b * B) per device, i.e. it grows with the global batch.
- ``"softmax_tiled"``: the same value, block by block (as in Inf-CL). Each device
  keeps its x block; y blocks travel around the ring with ``ppermute``, each one
  carrying the running column log-sum-exp of its columns, while the device keeps
  the running row log-sum-exp. One [b, tile] tile of logits serves both directions.
  A ``custom_vjp`` ring-passes again in the backward pass and recomputes the tiles.
  Memory O(b * tile + b * D) per device, independent of B.
- ``"sigmoid"``: SigLIP, L = -(1/B) sum_ij log sigmoid(z_ij s_ij), z_ij = +1 on the
  diagonal and -1 elsewhere. All-gathers y; tiles and VJP as ``"softmax"``.
  Memory O(b * B) per device.
- ``"sigmoid_chunked"``: the same value with y blocks passed around the ring, never
  gathered; a ``custom_vjp`` ring-passes again in the backward pass.
  Memory O(b * tile + b * D) per device.

``tile`` defaults to the largest divisor of b (B for the all-gather variants) that is
at most ``DEFAULT_TILE``, or to all of them where that divisor is narrow (`pick_tile`);
pass ``tile_size`` to ``compute`` to choose the ring variants'.
For the sigmoid variants ``bias=None`` means a bias of 0. For softmax the bias cancels out (its gradient is 0).

Numerics: inputs are upcast to float32 before the logits are formed (bf16 inputs
get bf16 gradients back), and every reduction uses a stable form (``logsumexp``,
softplus). Matmuls use JAX's default precision; on TPU/GPU wrap the call in
``jax.default_matmul_precision("highest")`` if you need full float32 products.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DEFAULT_TILE = 256  # [b, 256] f32 logits tiles: 2 MiB at b = 2048

# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _check_pair(x, y) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [batch, dim]; got x {x.shape} and y {y.shape}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape; got x {x.shape} and y {y.shape}")


def _axis_names(axis) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _check_mesh(batch: int, mesh, axis) -> int:
    """Returns the number of devices along ``axis`` (1 without a mesh)."""
    if mesh is None:
        return 1
    for name in _axis_names(axis):
        if name not in mesh.shape:
            raise ValueError(f"axis {name!r} is not a mesh axis; mesh axes are {tuple(mesh.shape)}")
    size = math.prod(mesh.shape[name] for name in _axis_names(axis))
    if batch % size:
        raise ValueError(
            f"batch size {batch} is not divisible by mesh axis {axis!r} of size {size}; "
            f"use a global batch that is a multiple of {size}"
        )
    return size


def pick_tile(local_batch: int, tile_size: int | None) -> int:
    """The logits tile width for ``local_batch`` columns (``tile_size`` or the default);
    the memory planner (plan.py) sizes the tiles with it.

    The default is the largest divisor of ``local_batch`` up to ``DEFAULT_TILE``, unless
    that is under a quarter of it (a batch such as 8 x 257 has no divisor between 9 and
    256): tiles that narrow would run one loop step per few columns, so the columns are
    then taken whole, as one tile.
    """
    if tile_size is None:
        best = max(t for t in range(1, min(local_batch, DEFAULT_TILE) + 1) if local_batch % t == 0)
        return best if best == local_batch or 4 * best >= DEFAULT_TILE else local_batch
    if tile_size <= 0 or local_batch % tile_size:
        raise ValueError(
            f"tile_size {tile_size} must be a positive divisor of the per-device batch "
            f"{local_batch}"
        )
    return tile_size


# ---------------------------------------------------------------------------
# Collectives that degrade to no-ops without a mesh (axis=None)
# ---------------------------------------------------------------------------


def _psum(value, axis):
    return value if axis is None else lax.psum(value, axis)


def _gather(block, axis):  # [b, ...] -> [B, ...]
    return block if axis is None else lax.all_gather(block, axis, tiled=True)


def _logsumexp_over_devices(partial, axis):
    """log sum_devices exp(partial): combines per-device log-sum-exps stably."""
    if axis is None:
        return partial
    peak = lax.pmax(lax.stop_gradient(partial), axis)
    return peak + jnp.log(lax.psum(jnp.exp(partial - peak), axis))


def _fresh(value, axis):
    """Marks a value as per-device: a freshly created loop carry, so that its type stays
    fixed once per-device data flows into it, or a replicated input of a custom VJP whose
    gradient is this device's share."""
    return value if axis is None else lax.pcast(value, axis, to="varying")


def _pass_on(tree, axis, n):
    """Sends every array in ``tree`` to the next device along the ring."""
    if n == 1:
        return tree
    ring = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda a: lax.ppermute(a, axis, ring), tree)


def _on_mesh(body, mesh, axis, in_specs, out_specs):
    """Runs ``body(*local_blocks, axis=...)`` per device, or directly without a mesh."""
    if mesh is None:
        return lambda *args: body(*args, axis=None)
    per_device = jax.shard_map(
        lambda *args: body(*args, axis=axis), mesh=mesh, in_specs=in_specs, out_specs=out_specs
    )
    return lambda *args: per_device(*_place(args, mesh, axis, in_specs))


def _place(args, mesh, axis, specs):
    """Lays inputs out as ``shard_map`` expects: a no-op for arrays already sharded
    that way; for others a reshard (Explicit mesh axes) or a sharding constraint."""
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = any(axis_types[name] == AxisType.Explicit for name in _axis_names(axis))
    move = jax.reshard if explicit else lax.with_sharding_constraint
    return jax.tree.map(lambda a, spec: move(a, NamedSharding(mesh, spec)), args, specs)


def _specs(axis):
    rows = P(axis, None)  # [B, D] sharded by rows
    return rows, P(axis), P()  # embeddings, per-example vectors, replicated


def _positives(x, y, scale, bias):  # [b, D], [b, D] -> [b]: the diagonal logits s_ii
    return scale * jnp.sum(x * y, axis=-1) + bias


def _logits(x, y, scale, bias):  # [b, D], [t, D] -> [b, t]
    return scale * jnp.einsum("id,jd->ij", x, y) + bias


# ---------------------------------------------------------------------------
# All-gather variants: each device builds [b, B] slices of the logits
# ---------------------------------------------------------------------------


# The all-gather variants form this device's [b, B] block of logits against the gathered
# y, a [b, tile] tile at a time, and keep the tiles' products x @ y^T for the backward
# pass (so 6 B^2 D matmul FLOPs, as autodiff, without recomputing them like the ring).
# Tile by tile, each elementwise pass runs on a tile still in cache, where autodiff
# through logsumexp / log_sigmoid made about ten passes over the whole block and kept
# its exponentials besides.


def _column_tiles(y_all, tile):  # [B, D] -> [B / tile, tile, D]
    return y_all.reshape(y_all.shape[0] // tile, tile, y_all.shape[1])


def _transposed_rows(x):  # [b, D] -> [D, b], laid out as such in memory
    """x^T, for the gradient G^T @ x of a logits tile G [b, tile] as (x^T @ G)^T: on CPU
    a product whose left operand is contracted over its first axis runs at 0.70-0.75
    of the plain [D, b] x [b, tile] one (XLA:CPU, B = 8192: 144-148 against 198-204
    GFLOP/s), and that product is a third of the loss's matmul FLOPs. Outside the tile
    loop, XLA keeps it a transposed copy instead of folding it back into the product."""
    return jnp.transpose(x)


def _block_backward(logit_grads, x, y_tiles, scale, bias, products, per_tile):
    """(dx, dy_all, d scale, d bias) of a function of the block's logits whose gradient
    w.r.t. one tile of them is ``logit_grads(logits, per_tile slice)``: dx = scale * G @ y,
    dy = scale * G^T @ x, d scale = sum_ij G_ij <x_i, y_j> = sum(x * (G @ y)), d bias = sum(G).
    dy is formed transposed, as x^T @ G (see `_transposed_rows`).
    """
    x_t = _transposed_rows(x)  # [D, b]

    def tile_step(grads_y, tile_inputs):
        y_tile, products_tile, state = tile_inputs
        grads = logit_grads(scale * products_tile + bias, state)  # [b, tile]
        return grads_y + grads @ y_tile, (x_t @ grads, jnp.sum(grads))  # ..., [D, tile]

    grads_y, (dy_t, dbias) = lax.scan(tile_step, jnp.zeros_like(x),
                                      (y_tiles, products, per_tile))
    dy = jnp.swapaxes(dy_t, 1, 2).reshape(-1, x.shape[1])  # [B / tile, D, tile] -> [B, D]
    return scale * grads_y, scale * dy, jnp.sum(x * grads_y), jnp.sum(dbias)


def _tiled_block(tile_statistics, tile_grads, x, y_all, scale, bias, *, axis, init):
    """Statistics of this device's block of logits s = scale x y_all^T + bias, tile by
    tile, with the custom VJP of `_block_backward`.

    ``tile_statistics(carry, logits_tile) -> (carry, per-tile output)`` runs over the
    tiles from ``init``; the value is (the last carry, the per-tile outputs stacked).
    ``tile_grads(value, cotangent) -> (grads, per_tile)`` gives the backward pass
    ``grads(logits_tile, per_tile slice)``, the gradient w.r.t. one tile of logits.
    """
    tile = pick_tile(y_all.shape[0], None)

    @jax.custom_vjp
    def block(x, y_all, scale, bias):
        return block_fwd(x, y_all, scale, bias)[0]

    def block_fwd(x, y_all, scale, bias):
        y_tiles = _column_tiles(y_all, tile)

        def tile_step(carry, y_tile):
            products = x @ y_tile.T  # [b, tile]
            carry, per_tile = tile_statistics(carry, scale * products + bias)
            return carry, (products, per_tile)

        carry, (products, per_tile) = lax.scan(tile_step, _fresh(init, axis), y_tiles)
        value = (carry, per_tile)
        return value, (x, y_tiles, scale, bias, products, value)

    def block_bwd(residuals, cotangent):
        x, y_tiles, scale, bias, products, value = residuals
        grads, per_tile = tile_grads(value, cotangent)
        return _block_backward(grads, x, y_tiles, scale, bias, products, per_tile)

    block.defvjp(block_fwd, block_bwd)
    # Per-device scale and bias: their gradients here are this device's shares, which
    # autodiff then sums over the devices.
    return block(x, y_all, _fresh(scale, axis), _fresh(bias, axis))


def _log_sum_exps_of_tile(row_lse, logits):  # the running row sums; each tile's column ones
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    return row_lse, jax.nn.logsumexp(logits, axis=0)


def _log_sum_exps_grads(value, cotangent):
    """d_row P + d_col Q per tile, with P and Q the block's row and column softmax."""
    (row_lse, col_lse), (d_row, d_col) = value, cotangent  # [b], [B / tile, tile]

    def grads(logits, column):
        col_lse, d_col = column  # [tile], [tile]
        return (d_row[:, None] * jnp.exp(logits - row_lse[:, None])
                + d_col[None, :] * jnp.exp(logits - col_lse[None, :]))

    return grads, (col_lse, d_col)


def _softplus(s):
    """log(1 + e^s) = -log sigmoid(-s), stably: the same bits as ``jax.nn.softplus``
    (its ``logaddexp(s, 0)`` form), in a third of its time on XLA:CPU (8192^2 logits:
    35 ms against 100)."""
    return jnp.maximum(s, 0) + jnp.log1p(jnp.exp(-jnp.abs(s)))


def _negatives_of_tile(total, logits):  # sum_ij log sigmoid(-s_ij)
    return total - jnp.sum(_softplus(logits)), None


def _negatives_grads(value, cotangent):
    d_total = cotangent[0]
    return lambda logits, _: -d_total * jax.nn.sigmoid(logits), ()


def _softmax_gathered_body(x, y, scale, bias, *, axis):
    # One [b, B] block of logits serves both directions: its rows are this device's
    # rows of s, and its columns hold this device's share of every column's sum.
    y_all = _gather(y, axis)  # [B, D]
    positives = _positives(x, y, scale, bias)  # [b]
    row_lse, col_lse = _tiled_block(_log_sum_exps_of_tile, _log_sum_exps_grads, x, y_all,
                                    scale, bias, axis=axis,
                                    init=jnp.full(x.shape[:1], -jnp.inf, jnp.float32))
    col_lse = _logsumexp_over_devices(col_lse.reshape(-1), axis)  # [B]
    local = jnp.sum(row_lse) - 2 * jnp.sum(positives)  # the diagonal counts once per direction
    return (_psum(local, axis) + jnp.sum(col_lse)) / (2 * y_all.shape[0])


def _sigmoid_gathered_body(x, y, scale, bias, *, axis):
    # log sigmoid(s) = log sigmoid(-s) + s: every pair scored as a negative, plus the
    # diagonal logits once, so no [b, B] tensor of signs is built (as the ring variant).
    y_all = _gather(y, axis)  # [B, D]
    positives = _positives(x, y, scale, bias)  # [b]
    negatives, _ = _tiled_block(_negatives_of_tile, _negatives_grads, x, y_all, scale, bias,
                                axis=axis, init=jnp.zeros((), jnp.float32))
    local = negatives + jnp.sum(positives)
    return -_psum(local, axis) / y_all.shape[0]


def _gathered(body):
    def loss(x, y, scale, bias, *, mesh, axis, tile_size):
        del tile_size  # nothing to tile
        rows, _, rep = _specs(axis)
        return _on_mesh(body, mesh, axis, (rows, rows, rep, rep), rep)(x, y, scale, bias)

    return loss


# ---------------------------------------------------------------------------
# Ring variants: y blocks travel around the devices, [b, tile] logits at a time
# ---------------------------------------------------------------------------


def _ring_over_tiles(tile_fn, kept, y, columns, *, axis, n, tile):
    """Visits every [b, tile] tile of this device's rows of the logits.

    The y block [b, D] and its per-column state ``columns`` (a tuple of [..., b]
    arrays: the b columns on the last axis) move one device along the ring per step,
    so after n steps they have met every x block and are back home. Within a step the
    tiles are visited in order: ``kept, column_tiles = tile_fn(kept, y_tile,
    column_tiles)``; the column state is updated in place, so each travelling array
    exists once (plus its ring buffer).
    """
    starts = jnp.arange(0, y.shape[0], tile)

    def tile_step(carry, start):
        kept, y, columns = carry
        y_tile = lax.dynamic_slice_in_dim(y, start, tile)  # [tile, D]
        column_tiles = tuple(lax.dynamic_slice_in_dim(a, start, tile, a.ndim - 1)
                             for a in columns)
        kept, column_tiles = tile_fn(kept, y_tile, column_tiles)
        columns = tuple(lax.dynamic_update_slice_in_dim(a, t, start, a.ndim - 1)
                        for a, t in zip(columns, column_tiles))
        return (kept, y, columns), None

    def ring_step(_, carry):
        kept, y, columns = carry
        next_y = _pass_on(y, axis, n)  # independent of this step's tiles: can overlap them
        (kept, _, columns), _ = lax.scan(tile_step, (kept, y, columns), starts)
        return kept, next_y, _pass_on(columns, axis, n)

    kept, _, columns = lax.fori_loop(0, n, ring_step, (kept, y, columns))
    return kept, columns


def _softmax_ring_forward(x, y, scale, bias, *, axis, n, tile):
    """Row and column log-sum-exp of s for this device's rows / columns."""
    minus_inf = _fresh(jnp.full(x.shape[:1], -jnp.inf, jnp.float32), axis)  # [b]

    def tile_fn(row_lse, y_tile, column_tiles):
        (col_lse,) = column_tiles  # [tile]
        logits = _logits(x, y_tile, scale, bias)  # [b, tile]
        row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
        col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))
        return row_lse, (col_lse,)

    row_lse, (col_lse,) = _ring_over_tiles(
        tile_fn, minus_inf, y, (minus_inf,), axis=axis, n=n, tile=tile
    )
    total = _psum(jnp.sum(row_lse) + jnp.sum(col_lse), axis)
    return total, (row_lse,), (col_lse,)


def _sigmoid_ring_forward(x, y, scale, bias, *, axis, n, tile):
    """sum_ij log sigmoid(-s_ij) over all pairs: every pair scored as a negative."""

    def tile_fn(partial_sum, y_tile, column_tiles):
        logits = _logits(x, y_tile, scale, bias)  # [b, tile]
        return partial_sum - jnp.sum(_softplus(logits)), column_tiles

    partial_sum, _ = _ring_over_tiles(
        tile_fn, _fresh(jnp.zeros((), jnp.float32), axis), y, (), axis=axis, n=n, tile=tile
    )
    return _psum(partial_sum, axis), (), ()


def _softmax_logit_grads(logits, row_state, col_state):
    """d(sum of row and column log-sum-exps) / d logits for one tile: P + Q."""
    (row_lse,), (col_lse,) = row_state, col_state  # [b], [tile]
    return jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - col_lse[None, :])


def _sigmoid_logit_grads(logits, row_state, col_state):
    """d(sum of log sigmoid(-s)) / d logits for one tile."""
    del row_state, col_state
    return -jax.nn.sigmoid(logits)


def _ring_backward(logit_grads, x, y, scale, bias, row_state, col_state, cotangent, *,
                   axis, n, tile):
    """Gradients of the ring total: recompute each tile, ring-pass dy with its y block.

    With G = d total / d s, dx = scale * G @ y and dy = scale * G^T @ x. Both are
    accumulated without the scale, which also gives d scale = sum_ij G_ij <x_i, y_j>
    = sum(x * (G @ y)) at the end, so no tile besides the logits and G is kept.
    dy travels transposed, [D, b], and grows by x^T @ G (see `_transposed_rows`).
    """
    x_t = _transposed_rows(x)  # [D, b]

    def tile_fn(kept, y_tile, column_tiles):
        dx, dbias = kept  # [b, D], []
        dy_t_tile, *col_tile = column_tiles  # [D, tile], [tile]...
        logits = _logits(x, y_tile, scale, bias)  # [b, tile]
        grads = cotangent * logit_grads(logits, row_state, tuple(col_tile))  # [b, tile]
        dx = dx + grads @ y_tile
        dy_t_tile = dy_t_tile + x_t @ grads  # [D, tile]
        return (dx, dbias + jnp.sum(grads)), (dy_t_tile, *col_tile)

    zero = _fresh(jnp.zeros((), jnp.float32), axis)
    (dx, dbias), (dy_t, *_) = _ring_over_tiles(
        tile_fn, (_fresh(jnp.zeros(x.shape), axis), zero), y,
        (_fresh(jnp.zeros(x_t.shape), axis), *col_state), axis=axis, n=n, tile=tile
    )
    dscale = _psum(jnp.sum(x * dx), axis)
    return scale * dx, scale * dy_t.T, dscale, _psum(dbias, axis)


def _ring_total(forward_body, logit_grads, num_states, x, y, scale, bias, *, mesh, axis,
                tile_size):
    """The ring reduction as a differentiable global function with a lean custom VJP.

    ``forward_body`` returns the total and ``num_states`` per-row and per-column [b]
    states that ``logit_grads`` needs. Residuals are only x, y, scale, bias and those
    states, so the backward pass holds no [b, B] logits either.
    """
    n = _check_mesh(x.shape[0], mesh, axis)
    tile = pick_tile(x.shape[0] // n, tile_size)
    rows, vector, rep = _specs(axis)
    states = (vector,) * num_states

    def forward_body_on_device(x, y, scale, bias, *, axis):
        return forward_body(x, y, scale, bias, axis=axis, n=n, tile=tile)

    def backward_body_on_device(x, y, scale, bias, row_state, col_state, cotangent, *, axis):
        return _ring_backward(logit_grads, x, y, scale, bias, row_state, col_state, cotangent,
                              axis=axis, n=n, tile=tile)

    run_forward = _on_mesh(forward_body_on_device, mesh, axis,
                           (rows, rows, rep, rep), (rep, states, states))
    run_backward = _on_mesh(backward_body_on_device, mesh, axis,
                            (rows, rows, rep, rep, states, states, rep), (rows, rows, rep, rep))

    @jax.custom_vjp
    def total(x, y, scale, bias):
        return run_forward(x, y, scale, bias)[0]

    def total_fwd(x, y, scale, bias):
        value, row_state, col_state = run_forward(x, y, scale, bias)
        return value, (x, y, scale, bias, row_state, col_state)

    def total_bwd(residuals, cotangent):
        return run_backward(*residuals, cotangent)

    total.defvjp(total_fwd, total_bwd)
    if mesh is not None:  # cotangents must come back laid out like the primals
        x, y, scale, bias = _place((x, y, scale, bias), mesh, axis, (rows, rows, rep, rep))
    return total(x, y, scale, bias)


def _softmax_tiled(x, y, scale, bias, *, mesh, axis, tile_size):
    batch = x.shape[0]
    lse_sum = _ring_total(_softmax_ring_forward, _softmax_logit_grads, 1, x, y, scale, bias,
                          mesh=mesh, axis=axis, tile_size=tile_size)
    positives = _positives(x, y, scale, bias)  # [B], row-wise, stays sharded
    return lse_sum / (2 * batch) - jnp.sum(positives) / batch


def _sigmoid_chunked(x, y, scale, bias, *, mesh, axis, tile_size):
    # log sigmoid(s) = log sigmoid(-s) + s, so scoring every pair as a negative and
    # adding the diagonal logits once gives sum_ij log sigmoid(z_ij s_ij).
    batch = x.shape[0]
    negatives_sum = _ring_total(_sigmoid_ring_forward, _sigmoid_logit_grads, 0, x, y, scale,
                                bias, mesh=mesh, axis=axis, tile_size=tile_size)
    positives = _positives(x, y, scale, bias)  # [B]
    return -(negatives_sum + jnp.sum(positives)) / batch


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

LOSSES: dict[str, Callable] = {
    "softmax": _gathered(_softmax_gathered_body),
    "softmax_tiled": _softmax_tiled,
    "sigmoid": _gathered(_sigmoid_gathered_body),
    "sigmoid_chunked": _sigmoid_chunked,
}
NAMES = tuple(LOSSES)


def compute(name, x, y, *, scale, bias=None, mesh=None, axis="data", tile_size=None):
    """The contrastive loss ``name`` (one of ``NAMES``) of paired embeddings x, y [B, D].

    ``scale`` is the positive logit multiplier (already exponentiated), ``bias`` the
    additive logit bias (None means 0). With a ``mesh`` the batch is sharded along
    ``axis`` (a mesh axis name or a tuple of names); B must be divisible by its size. Inputs are upcast to float32.
    ``tile_size`` (ring variants only) sets the logits tile width, which must divide
    the per-device batch. Returns a float32 scalar, differentiable in x, y, scale, bias.
    On a mesh with Explicit axes take gradients under ``jax.jit`` (as a train step
    does) or inside ``jax.set_mesh(mesh)``; plain eager ``jax.grad`` cannot seed them.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names are {', '.join(NAMES)}")
    _check_pair(x, y)
    _check_mesh(x.shape[0], mesh, axis)
    scale = jnp.asarray(scale, jnp.float32)
    bias = jnp.zeros((), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if scale.shape != () or bias.shape != ():
        raise ValueError(
            f"scale and bias must be scalars; got shapes {scale.shape} and {bias.shape}"
        )
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return LOSSES[name](x, y, scale, bias, mesh=mesh, axis=axis, tile_size=tile_size)


def alignment(x, y, alpha=2, *, mesh=None, axis="data"):
    """mean_i ||x_i - y_i||^alpha (Wang & Isola, 2020). Row-wise, so a sharded batch
    needs no communication; ``mesh``/``axis`` only validate the batch split."""
    _check_pair(x, y)
    _check_mesh(x.shape[0], mesh, axis)
    diff = x.astype(jnp.float32) - y.astype(jnp.float32)
    # (||d||^2)^(alpha/2) keeps the gradient finite at d = 0 for alpha = 2.
    return jnp.mean(jnp.sum(diff * diff, axis=-1) ** (alpha / 2))


def _uniformity_body(x, t, *, axis):
    x_all = _gather(x, axis)  # [B, D]
    local, total = x.shape[0], x_all.shape[0]
    first_row = 0 if axis is None else lax.axis_index(axis) * local
    sq_norms = jnp.sum(x_all * x_all, axis=-1)  # [B]
    local_sq = jnp.sum(x * x, axis=-1)  # [b]
    sq_dist = local_sq[:, None] + sq_norms[None, :] - 2 * x @ x_all.T  # [b, B]
    sq_dist = jnp.maximum(sq_dist, 0.0)
    is_self = jnp.arange(total)[None, :] == first_row + jnp.arange(local)[:, None]
    exponents = jnp.where(is_self, -jnp.inf, -t * sq_dist)
    lse = _logsumexp_over_devices(jax.nn.logsumexp(exponents), axis)
    return lse - math.log(total * (total - 1))


def uniformity(x, t=2, *, mesh=None, axis="data"):
    """log mean_{i != j} exp(-t ||x_i - x_j||^2) over the global batch (Wang & Isola,
    2020). With a mesh each device compares its rows with the all-gathered batch."""
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [batch, dim]; got {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings; got batch size {x.shape[0]}")
    _check_mesh(x.shape[0], mesh, axis)
    rows, _, rep = _specs(axis)
    run = _on_mesh(_uniformity_body, mesh, axis, (rows, rep), rep)
    return run(x.astype(jnp.float32), jnp.asarray(t, jnp.float32))
