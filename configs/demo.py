"""Embedded demo: a tiny GPT learns a generated arithmetic language, no downloads, < 5 min on CPU.

    python -m jaxft.train --config=configs/demo.py
"""
from configs import common


def get_config(arg=None):
  """`arg` picks the objective variant: configs/demo.py:next_token (the default)."""
  c = common.get_config()
  if arg not in (None, 'next_token'):
    raise ValueError(f'configs/demo.py has no variant {arg!r}; known: next_token')
  c.data.source = 'demo'
  c.data.seq_len = 128
  c.train.steps = 400
  c.train.eval_every = 100
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 30
  c.checkpoint.every = 100
  return c
