"""The device mesh every sharded computation in the package uses: one axis, ``"data"``, over all devices.

Batches are split along ``"data"`` and parameters are replicated. The same code runs on one CPU, on 8
simulated CPU devices in tests, and on a TPU pod (there ``jax.devices()`` spans every host).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device.")
  # Auto axes: jax.make_mesh defaults to Explicit axes in JAX 0.10, under which Flax's Dropout fails on a
  # batch-sharded input; shard_map and NamedSharding behave the same on either.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"``, every other axis whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device (parameters, optimizer state, keys)."""
  return NamedSharding(mesh, P())


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins a multi-process JAX cluster; call before any other JAX work.

  With no arguments JAX detects the cluster (Cloud TPU pods, SLURM, Open MPI, ...). Explicit values (e.g.
  ``localhost:12355``, 2, 0 for two processes on one machine) override detection. Errors are raised, never
  swallowed: a process that silently ran alone would certify or train on the wrong subset of the data.
  """
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes > 0:
    kwargs["num_processes"] = num_processes
  if process_id >= 0:
    kwargs["process_id"] = process_id
  jax.distributed.initialize(**kwargs)
