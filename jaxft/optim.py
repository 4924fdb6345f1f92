"""The optax chain from config: clip -> AdamW (masked weight decay) on a warm-up + decay schedule."""
import re

import optax

from jaxft import model


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
  raise ValueError(f"unknown optim.schedule {optim_cfg.schedule!r}; known: 'cosine', 'constant'")


def build(optim_cfg, steps):
  """(optax transformation, learning-rate schedule)."""
  no_decay = re.compile(optim_cfg.no_decay) if optim_cfg.no_decay else None
  decay_mask = lambda params: model.map_with_path(
      lambda path, _: not (no_decay and no_decay.search(path)), params)
  lr = schedule(optim_cfg, steps)
  tx = optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                   weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  if optim_cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  return tx, lr
