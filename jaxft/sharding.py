"""The device mesh and the ONE table that maps the model's logical axes onto it.

Mesh axes: `data` (replicas), `fsdp` (params and optimizer state sharded, batch too), `tensor`
(heads / MLP / vocab split). The model names only logical axes; this file is the only place they meet.
"""
import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or axes, or None = replicated).
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('kv', None),
)


def make_mesh(mesh_cfg, devices=None):
  """Mesh of shape (data, fsdp, tensor) from config; one -1 entry takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  shape = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  if shape.count(-1) > 1:
    raise ConfigError(f'at most one of mesh.data/fsdp/tensor may be -1, got {shape}')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ConfigError(f'{len(devices)} devices do not divide by mesh {shape}')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ConfigError(f'mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, '
                     f'have {len(devices)}')
  # Auto axes: GSPMD propagates shardings through plain matmuls (Explicit axes would reject them).
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


@contextlib.contextmanager
def activate(mesh):
  """Everything that builds or shards the model runs inside this: mesh + the rules table."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    yield


def logical_to_spec(axes):
  """('batch', None) -> P(('data', 'fsdp'), None) through RULES."""
  table = dict(RULES)
  return P(*(table[a] if a is not None else None for a in axes))


def state_shardings(abstract_state, mesh):
  """NamedShardings for a (possibly abstract) state tree, from each Param's logical axes.

  Fails up front, naming the parameter, if a dimension does not divide over its mesh axes.
  """
  with activate(mesh):
    shardings = nnx.get_named_sharding(abstract_state, mesh)
  bad = []
  flat = jax.tree_util.tree_leaves_with_path(abstract_state)
  for (path, x), sh in zip(flat, jax.tree.leaves(shardings)):
    for size, axes in zip(x.shape, sh.spec):
      n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      if size % n:
        bad.append((jax.tree_util.keystr(path), size, axes, n))
  if bad:  # Name a param rather than its optimizer moments.
    name, size, axes, n = min(bad, key=lambda b: 'opt_state' in b[0])
    raise ConfigError(f'{name} has a dimension of {size}, not divisible over mesh axes {axes} '
                      f'({n} devices): change the mesh or the model size'
                      + (f' ({len(bad) - 1} more arrays alike)' if len(bad) > 1 else ''))
  return shardings


def batch_sharding(mesh, ndim=2):
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1)))


def shard_batch(batch, mesh):
  """Host-local numpy batch (this process's rows) -> global jax arrays sharded over batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in batch.items()}
