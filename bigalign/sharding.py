"""The device mesh and how arrays are laid out on it.

The only module that knows device layout. The mesh has one axis, `data`, over
which the batch is split; parameters and optimizer state are replicated.
Each process feeds its own slice of the global batch, assembled here into one
global `jax.Array`.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bigalign.errors import UserError

DATA_AXIS = "data"


def num_data_shards(mesh_config) -> int:
    """The size of the data axis: `mesh_config.data` devices (-1: all of them)."""
    num_devices = jax.device_count()
    data = num_devices if mesh_config.data == -1 else mesh_config.data
    if data < 1 or data > num_devices or num_devices % data:
        raise UserError(
            f"mesh.data={mesh_config.data} does not fit the {num_devices} available devices; "
            f"set --config.mesh.data=-1 (all devices) or a divisor of {num_devices}"
        )
    return data


def make_mesh(mesh_config) -> Mesh:
    """A 1-D mesh over the first `num_data_shards(mesh_config)` devices."""
    data = num_data_shards(mesh_config)
    # Auto axes: XLA propagates shardings from the ones we set on inputs and outputs.
    return jax.make_mesh(
        (data,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:data]
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global jax.Arrays sharded over the data axis."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
