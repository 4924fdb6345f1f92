"""The optax chain from config: clip -> AdamW (masked weight decay) on a warm-up + decay schedule,
applied to the trainable parameters only (frozen ones get no optimizer state at all), inside
apply_if_finite (non-finite gradients: skip the update or stop)."""
import re

import jax
import jax.numpy as jnp
import optax

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


MOMENTS_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}  # optim.moments_dtype -> dtype.


def adamw(optim_cfg, lr, mask):
  """optax.adamw with its two moments (mu, nu) stored in optim.moments_dtype; the update itself
  is computed in float32 either way."""
  name = optim_cfg.moments_dtype
  if name not in MOMENTS_DTYPES:
    raise ConfigError(f'unknown optim.moments_dtype {name!r}; known: '
                      + ', '.join(map(repr, MOMENTS_DTYPES)))
  dtype = MOMENTS_DTYPES[name]
  tx = optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                   weight_decay=optim_cfg.weight_decay, mask=mask, mu_dtype=dtype)
  if dtype is None:
    return tx
  # optax has a mu_dtype but no nu_dtype; scale_by_adam, though, casts nu back to the dtype it is
  # stored in after every update, so a nu made bf16 at init stays bf16. (bf16 rounds away a
  # per-step change below ~0.2%: with b2 = 0.999 nu could no longer decay.)
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  init = lambda params: jax.tree.map(
      lambda s: s._replace(nu=optax.tree.cast(s.nu, dtype)) if is_adam(s) else s,
      tx.init(params), is_leaf=is_adam)
  return tx._replace(init=init)


def trainable_fn(spec):
  """train.trainable -> predicate on parameter paths: 'all', 'head' (classification's `score`) or
  a regex searched in paths like 'h/0/attn/c_attn_kernel'."""
  if spec == 'all':
    return lambda path: True
  if spec == 'head':
    return lambda path: path == model.HEAD
  pattern = re.compile(spec)
  return lambda path: bool(pattern.search(path))


def build(optim_cfg, steps, trainable=None):
  """(optax transformation, learning-rate schedule); `trainable(path)` picks what is updated."""
  no_decay = re.compile(optim_cfg.no_decay) if optim_cfg.no_decay else None
  decay_mask = lambda params: model.map_with_path(
      lambda path, _: not (no_decay and no_decay.search(path)), params)
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
  tx = optax.apply_if_finite(tx, max_consecutive_errors=optim_cfg.skip_nonfinite)
  return tx, lr
