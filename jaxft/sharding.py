"""The device mesh and the ONE table that maps the model's logical axes onto it.

Mesh axes: `data` (replicas), `fsdp` (params and optimizer state sharded, batch too), `tensor`
(heads / MLP / vocab split). The model names only logical axes; this file is the only place they meet.
"""
import contextlib
import math

import jax
import numpy as np
import optax
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

# ... plus one rule for FSDP: a parameter (or AdamW moment) whose RULES spec leaves 'fsdp' unused
# (the attention and MLP biases, over heads / kv / mlp) is also split over 'fsdp', on its largest
# dimension that divides, so that each device holds 1/N of the params + optimizer state and no
# replicated remainder. This cannot be a RULES entry: nnx looks each logical axis up on its own,
# so 'mlp' -> ('tensor', 'fsdp') would name 'fsdp' twice in c_fc_kernel ('embed', 'mlp').
# An array none of whose dimensions divides keeps its RULES spec: it is a few numbers.

# The config key that sets each logical axis's size: named when a mesh axis does not divide it.
AXIS_KEYS = {'embed': 'model.embed_dim', 'mlp': 'model.mlp_dim', 'heads': 'model.num_heads',
             'vocab': 'model.vocab_size / model.vocab_multiple'}


def make_mesh(mesh_cfg, devices=None):
  """Mesh of shape (data, fsdp, tensor) from config; one -1 entry takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  shape = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  if any(s < 1 and s != -1 for s in shape):
    raise ConfigError(f'mesh.data/fsdp/tensor are device counts (or -1: the rest), got {shape}')
  if shape.count(-1) > 1:
    raise ConfigError(f'at most one of mesh.data/fsdp/tensor may be -1, got {shape}')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      given = ' x '.join(f'mesh.{a}={s}' for a, s in zip(MESH_AXES, shape) if s != -1)
      raise ConfigError(f'{len(devices)} devices do not divide by {given}, so the -1 axis '
                        f'cannot take the rest')
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


def mesh_axes(entry):
  """One PartitionSpec entry (None, 'fsdp' or ('data', 'fsdp')) as a tuple of mesh axes."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def with_fsdp(spec, shape, mesh):
  """The FSDP rule under RULES: `spec` with 'fsdp' added to the largest (per device) dimension of
  `shape` that divides, unless 'fsdp' is already used or has size 1."""
  n = mesh.shape['fsdp']
  parts = list(spec) + [None] * (len(shape) - len(spec))
  if n == 1 or any('fsdp' in mesh_axes(p) for p in parts):
    return spec
  split = [math.prod(mesh.shape[a] for a in mesh_axes(p)) for p in parts]
  fits = [i for i, size in enumerate(shape) if size % (split[i] * n) == 0]
  if not fits:
    return spec
  i = max(fits, key=lambda i: shape[i] // split[i])
  # 'fsdp' last (minor): an all-gather over it alone gives back the RULES (e.g. 'tensor') layout.
  parts[i] = mesh_axes(parts[i]) + ('fsdp',) if parts[i] else 'fsdp'
  return P(*parts)


def state_shardings(abstract_state, mesh):
  """NamedShardings for a (possibly abstract) state tree, from each Param's logical axes through
  RULES and the FSDP rule under it.

  Fails up front, naming the parameter, if a dimension does not divide over its mesh axes.
  """
  with activate(mesh):
    shardings = nnx.get_named_sharding(abstract_state, mesh)
  # Annotated arrays: params and the moments that mirror them. A frozen param's optimizer state
  # holds an optax MaskedNode (no leaves) that nnx still gives a sharding: kept as it is, so the
  # shardings have the state's leaves and no others.
  def place(x, sh):
    if isinstance(x, nnx.Variable) and isinstance(x.get_value(), optax.MaskedNode):
      return x
    if isinstance(x, nnx.Variable) and x.get_metadata().get('out_sharding'):
      return sh.replace(NamedSharding(mesh, with_fsdp(sh.get_value().spec, x.shape, mesh)))
    return sh
  shardings = jax.tree.map(place, abstract_state, shardings,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  # Each annotated array's logical axes, by the path of its value (for the error below).
  logical = {jax.tree_util.keystr(path) + '.value': x.get_metadata().get('out_sharding')
             for path, x in jax.tree_util.tree_leaves_with_path(
                 abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
             if isinstance(x, nnx.Variable)}
  bad = []
  flat = jax.tree_util.tree_leaves_with_path(abstract_state)
  for (path, x), sh in zip(flat, jax.tree.leaves(shardings)):
    name = jax.tree_util.keystr(path)
    for d, (size, axes) in enumerate(zip(x.shape, sh.spec)):
      n = math.prod(mesh.shape[a] for a in mesh_axes(axes))
      if size % n:
        bad.append((name, size, axes, (logical.get(name) or ())[d:d + 1]))
  if bad:  # Name a param rather than its optimizer moments.
    name, size, axes, axis = min(bad, key=lambda b: 'opt_state' in b[0])
    by = ' x '.join(f'mesh.{a}={mesh.shape[a]}' for a in mesh_axes(axes))
    of = f' (its {axis[0]!r} axis: {AXIS_KEYS[axis[0]]})' if axis and axis[0] in AXIS_KEYS else ''
    raise ConfigError(f'{name} has a dimension of {size}{of}, not divisible over {by} devices: '
                      f'change the mesh or the model size'
                      + (f' ({len(bad) - 1} more arrays alike)' if len(bad) > 1 else ''))
  return shardings


def batch_sharding(mesh, ndim=2):
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1)))


def shard_batch(batch, mesh):
  """Host-local numpy batch (this process's rows) -> global jax arrays sharded over batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in batch.items()}
