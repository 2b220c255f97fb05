"""Similarity search on the device, one block of queries at a time.

Retrieval and zero-shot rank every candidate for every query. The [Q, N] similarity
matrix is never built whole, and never on the host: queries go to the devices in
blocks of `QUERY_BLOCK` rows, split over the mesh's batch axes, against all candidates
(replicated); each device reduces its rows of the block's similarities at once (the
top-k indices, or a row sum for uniformity). The host receives only the reduced
[Q, k] or [Q] results, so its memory grows with N, not N^2.

Ties rank the lower candidate index first (`lax.top_k`'s order, like a stable sort).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from bigalign import sharding

# Query rows per device call (padded to a multiple of the devices the batch is split over).
QUERY_BLOCK = 2048


def _replicate(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds whole -> a jax.Array replicated on the mesh."""
    return jax.make_array_from_callback(array.shape, sharding.replicated(mesh),
                                        lambda index: array[index])


@functools.lru_cache(maxsize=None)
def _compiled(reduce_rows, mesh: Mesh):
    """jit of (queries [b, E], candidates [N, E]) -> reduce_rows(queries @ candidates.T),
    each device reducing its own rows (shard_map: under plain jit, XLA all-gathers the
    [b, N] block and every device runs top_k on all of it)."""
    rows = P(sharding.BATCH_AXES)
    return jax.jit(jax.shard_map(lambda q, c: reduce_rows(q @ c.T), mesh=mesh,
                                 in_specs=(rows, P()), out_specs=rows),
                   out_shardings=sharding.replicated(mesh))


def by_query_block(reduce_rows, queries: np.ndarray, candidates: np.ndarray, mesh: Mesh) -> np.ndarray:
    """reduce_rows(similarities [b, N]) -> [b, ...], applied to every block of queries;
    the results concatenated: [Q, ...]. `reduce_rows` must be hashable (compiled once)."""
    queries = np.asarray(queries, np.float32)
    devices = sharding.batch_devices(mesh)
    block = min(QUERY_BLOCK, len(queries))
    block += (-block) % devices  # an equal share per device
    device_candidates = _replicate(np.asarray(candidates, np.float32), mesh)
    function = _compiled(reduce_rows, mesh)
    results = []
    for start in range(0, len(queries), block):
        rows = sharding.pad_rows(queries[start : start + block], block)[:block]
        results.append(np.asarray(function(sharding.shard_rows(rows, mesh), device_candidates)))
    return np.concatenate(results)[: len(queries)]


@functools.lru_cache(maxsize=None)
def _top_k_rows(k: int):
    return lambda similarities: jax.lax.top_k(similarities, k)[1]


def top_k(queries: np.ndarray, candidates: np.ndarray, k: int, mesh: Mesh) -> np.ndarray:
    """Indices [Q, min(k, N)] of each query's most similar candidates, best first (dot
    products of queries [Q, E] and candidates [N, E])."""
    return by_query_block(_top_k_rows(min(k, len(candidates))), queries, candidates, mesh)


@functools.lru_cache(maxsize=None)
def _gaussian_row_sums(t: float):
    # For unit vectors, ||x - y||^2 = 2 - 2 x.y.
    return lambda similarities: jnp.sum(jnp.exp(-t * (2.0 - 2.0 * similarities)), axis=1)


def gaussian_potential_row_sums(x: np.ndarray, t: float, mesh: Mesh) -> np.ndarray:
    """[N]: for each unit row x_i, the sum over all j (i included) of exp(-t ||x_i - x_j||^2)."""
    return by_query_block(_gaussian_row_sums(float(t)), x, x, mesh)
