"""The optax chain from config: clip -> AdamW (masked weight decay) on a warm-up + decay schedule,
applied to the trainable parameters only (frozen ones get no optimizer state at all), inside
apply_if_finite (non-finite gradients: skip the update or stop)."""
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft import model
from jaxft.config import ConfigError


def schedule(optim_cfg, steps):
  """Linear warm-up from 0 to lr, then cosine decay to min_lr_ratio * lr, or constant."""
  warmup = min(optim_cfg.warmup_steps, steps)
  if optim_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, optim_cfg.lr, warmup, max(steps, warmup + 1), optim_cfg.lr * optim_cfg.min_lr_ratio)
  if optim_cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim_cfg.lr, warmup), optax.constant_schedule(optim_cfg.lr)],
        [warmup])
  raise ConfigError(f"unknown optim.schedule {optim_cfg.schedule!r}; known: 'cosine', 'constant'")


MOMENTS_DTYPES = ('float32', 'bfloat16', 'int8')  # optim.moments_dtype.


class Int8AdamState(NamedTuple):
  """scale_by_adam's state in 8 bits: each moment as codes (its params' tree and shapes) and one
  float32 scale per row of the last axis (shapes with that axis 1). About 2.1 bytes per param
  for both moments instead of 8."""
  count: jax.Array
  mu: Any  # int8
  mu_scale: Any
  nu: Any  # uint8
  nu_scale: Any


# (code dtype, levels, power): a moment x is stored as sign(x) * round(levels * (|x| / s)^(1/p))
# for its row's scale s >= |x|. The power spends the levels on small values: mu (signed, p=2)
# resolves 1/127^2 of s, nu (p=4, the square of gradients, so the update's sqrt(nu) gets p=2
# too) 1/255^4.
MU_CODE, NU_CODE = (jnp.int8, 127, 2), (jnp.uint8, 255, 4)


def dequantize(codes, scale, code):
  _, levels, p = code
  y = codes.astype(jnp.float32) / levels
  return scale * jnp.sign(y) * jnp.abs(y) ** p


def mix32(x):
  """Wellons' lowbias32 integer hash, a bijection of uint32 whose output bits each flip with
  close to half of any input bit's flips."""
  x = x.astype(jnp.uint32)
  x = (x ^ (x >> 16)) * jnp.uint32(0x21f0aaad)
  x = (x ^ (x >> 15)) * jnp.uint32(0x735a2d97)
  return x ^ (x >> 15)


def hash_uniform(shape, seed):
  """One float32 in [0, 1) per element: a hash of the element's flat index (from iotas, so any
  sharding computes each element's own value) and the uint32 `seed`, 24 bits deep. It stands in
  for jax.random.uniform in the stochastic rounding: threefry's rounds, one copy per param,
  doubled XLA's compile of a step with int8 moments (H100 plan of a 6.7B step on a 2-core CPU:
  230 s, 113-120 s with this, 32 s with fp32 moments)."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride = stride * shape[axis] % 2**32
  bits = mix32(index ^ seed)
  return (bits >> 8).astype(jnp.float32) * 2.0**-24


def quantize(x, scale, code, seed=None):
  """The codes of float32 `x` under row scales `scale` (>= |x|, broadcast over the last axis).
  Rounding is to the nearest level, or with a uint32 `seed` stochastic between the two levels
  around |x|, unbiased (E[dequantize] = x): nu changes by (1 - b2) per step, less than a level's
  width, which nearest rounding can undo forever. A nonzero x never gets code 0 under
  stochastic rounding (nu = 0 would divide by eps)."""
  dtype, levels, p = code
  y = jnp.minimum(jnp.abs(x) / jnp.where(scale > 0, scale, 1.0), 1.0)
  c = levels * y ** (1.0 / p)
  if seed is None:
    q = jnp.round(c)
  else:
    lo = jnp.floor(c)
    below, above = (lo / levels) ** p, ((lo + 1) / levels) ** p
    q = lo + (hash_uniform(x.shape, seed) * (above - below) < y - below)
    q = jnp.where(x != 0, jnp.clip(q, 1, levels), 0)
  return (jnp.sign(x) * q).astype(dtype)


def int8_moments(adam, b1, b2):
  """`adam` (optax.scale_by_adam with these b1, b2) with its moments held in 8 bits between
  steps: dequantized to float32 for the update, which itself is exactly adam's, and quantized
  again after it. A row's new scale is bounded, not measured: b * old scale + (1 - b) * the
  row's largest |g| (mu) or g^2 (nu) bounds the new moment's row, so no reduction runs over the
  new float32 moments and dequantize -> Adam -> quantize can fuse into one elementwise pass per
  parameter. The stochastic rounding's seed comes from the step count: a resumed run draws the
  same bits, on any mesh."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  # A frozen param's moments (train.trainable) are Variables holding optax MaskedNodes: kept so.
  masked = lambda v: isinstance(v.get_value(), optax.MaskedNode)
  leaf_map = lambda fn, *trees: jax.tree.map(lambda v, *rest: v if masked(v) else fn(v, *rest),
                                             *trees, is_leaf=is_var)

  def zero_scales(params):  # One per row of the last axis; sharded like the params' rows.
    def zero(v):
      axes = tuple(v.get_metadata().get('out_sharding') or (None,) * len(v.shape))
      return v.replace(jnp.zeros(v.shape[:-1] + (1,)), out_sharding=axes[:-1] + (None,))
    return leaf_map(zero, params)

  def bounds(state, grads):
    """mu's and nu's new row scales from one reduction per param, max g^2 being (max |g|)^2:
    XLA kept two apart (6.7B H100 plan: 4,305 -> 3,843 fusions, its compile 113 -> 92-97 s)."""
    row_max = leaf_map(lambda s, g: s.replace(jnp.max(jnp.abs(g[...]), axis=-1, keepdims=True)),
                       state.mu_scale, grads)
    bound = lambda scales, b, k: leaf_map(
        lambda s, m: s.replace(b * s[...] + (1 - b) * m[...] ** k), scales, row_max)
    return bound(state.mu_scale, b1, 1), bound(state.nu_scale, b2, 2)

  def encode(moments, scales, code, count=None):
    leaves, treedef = jax.tree.flatten(moments, is_leaf=is_var)
    # One seed per (step, leaf), from the step count only.
    seeds = [None if count is None else mix32(mix32(count) + i) for i in range(len(leaves))]
    scales = jax.tree.leaves(scales, is_leaf=is_var)
    return jax.tree.unflatten(treedef, [
        m if masked(m) else m.replace(quantize(m[...], s[...], code, seed))
        for m, s, seed in zip(leaves, scales, seeds)])

  def decode(codes, scales, code):
    return leaf_map(lambda q, s: q.replace(dequantize(q[...], s[...], code)), codes, scales)

  def init(params):
    state, mu_scale, nu_scale = adam.init(params), zero_scales(params), zero_scales(params)
    return Int8AdamState(state.count, encode(state.mu, mu_scale, MU_CODE), mu_scale,
                         encode(state.nu, nu_scale, NU_CODE), nu_scale)

  def update(grads, state, params=None):
    full = optax.ScaleByAdamState(state.count, decode(state.mu, state.mu_scale, MU_CODE),
                                  decode(state.nu, state.nu_scale, NU_CODE))
    updates, full = adam.update(grads, full, params)
    mu_scale, nu_scale = bounds(state, grads)
    return updates, Int8AdamState(full.count, encode(full.mu, mu_scale, MU_CODE), mu_scale,
                                  encode(full.nu, nu_scale, NU_CODE, full.count), nu_scale)

  return optax.GradientTransformation(init, update)


def adamw(optim_cfg, lr, mask):
  """optax.adamw with its two moments (mu, nu) stored in optim.moments_dtype; the update itself
  is computed in float32 either way."""
  name = optim_cfg.moments_dtype
  if name not in MOMENTS_DTYPES:
    raise ConfigError(f'unknown optim.moments_dtype {name!r}; known: '
                      + ', '.join(map(repr, MOMENTS_DTYPES)))
  adam = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             mu_dtype=jnp.bfloat16 if name == 'bfloat16' else None)
  if name == 'bfloat16':
    # scale_by_adam has a mu_dtype but no nu_dtype; it casts nu back to the dtype it is stored
    # in after every update, though, so a nu made bf16 at init stays bf16. (bf16 rounds away a
    # per-step change below ~0.2%: with b2 = 0.999 nu could no longer decay.)
    def init(params, init_fp32=adam.init):
      state = init_fp32(params)
      return state._replace(nu=optax.tree.cast(state.nu, jnp.bfloat16))
    adam = adam._replace(init=init)
  elif name == 'int8':
    adam = int8_moments(adam, optim_cfg.b1, optim_cfg.b2)
  # optax.adamw's own chain.
  return optax.chain(adam, optax.add_decayed_weights(optim_cfg.weight_decay, mask),
                     optax.scale_by_learning_rate(lr))


def apply_if_finite(inner, max_consecutive_errors):
  """optax.apply_if_finite (same state, same decisions) choosing with a select per array instead
  of lax.cond. A cond's branch hands back the whole updates tree and new optimizer state as
  finished buffers; a select fuses into the update's elementwise pass, so nothing beyond the
  new state is held at once. XLA's H100 plan for a 6.7B step with int8 moments: 99.4 -> 50.5 GiB
  (bench --target=h100; fp32 moments: unchanged)."""
  def init(params):
    return optax.ApplyIfFiniteState(jnp.zeros([], jnp.int32), jnp.array(True),
                                    jnp.zeros([], jnp.int32), inner.init(params))

  def update(grads, state, params=None):
    finite = jnp.all(jnp.array([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
    in_a_row = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
    apply = finite | (in_a_row > max_consecutive_errors)
    updates, inner_state = inner.update(grads, state.inner_state, params)
    # A select, not a product: a NaN update times 0 would still be NaN.
    updates = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), inner_state,
                               state.inner_state)
    return updates, optax.ApplyIfFiniteState(
        in_a_row, finite,
        jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
        inner_state)

  return optax.GradientTransformation(init, update)


def schedule_count(opt_state):
  """The lr schedule's step count in `opt_state`: behind the train step by the updates skipped
  (apply_if_finite keeps a skipped step's inner state as it was)."""
  return optax.tree.get(opt_state, 'count', filtering=lambda path, _: (
      getattr(path[-1], 'tuple_name', None) == 'ScaleByScheduleState'))


def trainable_fn(spec):
  """train.trainable -> predicate on parameter paths: 'all', 'head' (classification's `score`) or
  a regex searched in paths like 'h/0/attn/c_attn_kernel'."""
  if spec == 'all':
    return lambda path: True
  if spec == 'head':
    return lambda path: path == model.HEAD
  pattern = re.compile(spec)
  return lambda path: bool(pattern.search(path))


def decays(optim_cfg):
  """path -> whether AdamW decays that param: unless optim.no_decay (a regex) is found in it."""
  try:
    no_decay = re.compile(optim_cfg.no_decay) if optim_cfg.no_decay else None
  except re.error as e:  # (Else a traceback, not the one-line error a bad config gets.)
    raise ConfigError(f'optim.no_decay={optim_cfg.no_decay!r} is not a regex: {e}') from None
  return lambda path: not (no_decay and no_decay.search(path))


def build(optim_cfg, steps, trainable=None):
  """(optax transformation, learning-rate schedule); `trainable(path)` picks what is updated."""
  decayed = decays(optim_cfg)
  decay_mask = lambda params: model.map_with_path(lambda path, _: decayed(path), params)
  lr = schedule(optim_cfg, steps)
  tx = adamw(optim_cfg, lr, decay_mask)
  if optim_cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  if trainable is not None:
    # Frozen params are routed to set_to_zero: no moments, no decay, not in the clipping norm.
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, lambda params: (
        model.map_with_path(lambda path, _: 'train' if trainable(path) else 'frozen', params)))
  # Always wrapped, so the optimizer state has one layout whatever skip_nonfinite says: up to that
  # many non-finite gradients in a row are dropped (no update, moments untouched); past it the
  # update goes through and the trainer stops before anything is saved.
  tx = apply_if_finite(tx, optim_cfg.skip_nonfinite)
  return tx, lr
