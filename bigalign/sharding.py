"""The device mesh and how arrays are laid out on it.

The only module that knows device layout. The mesh has two axes:

- `data`: pure data parallelism; parameters are replicated along it.
- `fsdp`: fully sharded data parallelism (ZeRO-3); the batch is split along it
  too, and every parameter and its optimizer state is split along its model-width
  dimension, all-gathered just in time for each layer by XLA.

So the batch is split over data x fsdp devices, and parameters over fsdp. Models
name the dimensions of their parameters and activations with logical axis names
(`"embed"`, `"mlp"`, `"batch"`, ...); `LOGICAL_AXIS_RULES` maps those names to
mesh axes. Each process feeds its own slice of the global batch, assembled here
into one global `jax.Array`.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bigalign.errors import UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over both

# Logical axis name -> mesh axis. Names without a rule ("mlp", "heads", "vocab", "layers",
# ...) are replicated. Sharding only the width keeps every kernel split evenly: a tower's
# width must be divisible by the fsdp size (config validation checks it).
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("embed", FSDP_AXIS),
)


def mesh_shape(mesh_config, num_devices: int | None = None) -> tuple[int, int]:
    """(data, fsdp) sizes on `num_devices` (default: this job's); `data=-1` takes every
    device not used by fsdp."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    fsdp = mesh_config.fsdp
    fix = (
        f"choose mesh.data x mesh.fsdp dividing the {num_devices} devices "
        f"(mesh.data=-1 takes all devices left after fsdp)"
    )
    if fsdp < 1 or num_devices % fsdp:
        raise UserError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices; {fix}")
    data = num_devices // fsdp if mesh_config.data == -1 else mesh_config.data
    if data < 1 or num_devices % (data * fsdp):
        raise UserError(
            f"mesh.data={mesh_config.data} x mesh.fsdp={fsdp} does not fit the "
            f"{num_devices} devices; {fix}"
        )
    return data, fsdp


def make_mesh(mesh_config) -> Mesh:
    """A (data, fsdp) mesh over the first data x fsdp devices."""
    shape = mesh_shape(mesh_config)
    # Auto axes: XLA propagates shardings from the ones we set on inputs, outputs and
    # the models' logical constraints.
    return jax.make_mesh(
        shape,
        BATCH_AXES,
        axis_types=(AxisType.Auto,) * 2,
        devices=jax.devices()[: math.prod(shape)],
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def logical_shardings(boxed_tree, mesh: Mesh):
    """Shardings for a tree whose leaves may carry flax logical axis names.

    Annotated leaves (parameters, and optimizer state that mirrors them) follow
    `LOGICAL_AXIS_RULES`; plain leaves (step counters, RNG keys) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def shardings_of(tree):
    """The sharding of every array in `tree` (e.g. a train state, to keep its layout)."""
    return jax.tree.map(lambda x: x.sharding, tree)


@contextlib.contextmanager
def logical_rules(mesh: Mesh):
    """Resolves model code's logical names against `mesh`; enter it inside the traced step.

    Activations are constrained (batch over data x fsdp) and annotated parameters are kept
    fsdp-sharded where a layer reads them, so XLA all-gathers each weight just in time.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            yield


def batch_devices(mesh: Mesh) -> int:
    """How many devices the batch is split over (data x fsdp)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
    """`array` [n, ...] with its last row repeated up to a multiple of `multiple` rows (so
    batches keep one shape, or every device gets an equal share)."""
    padding = (-len(array)) % multiple
    return np.concatenate([array, np.repeat(array[-1:], padding, axis=0)])


def shard_rows(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """An array every process holds whole -> a global jax.Array split over data x fsdp,
    each process placing only its own devices' rows."""
    return jax.make_array_from_callback(array.shape, batch_sharding(mesh), lambda index: array[index])


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global jax.Arrays split over data x fsdp."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
