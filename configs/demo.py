"""Embedded demo: a tiny GPT learns a generated arithmetic language, no downloads, minutes on CPU.

Every variant reads the same records ('23+58=81'): next_token learns the whole text, labeled_pair
answers the question ('23+58=' -> '81'), classification tells the answer's size from the question
alone (low < 50 <= mid < 100 <= high).

    python -m jaxft.train --config=configs/demo.py                  # next_token -> runs/demo
    python -m jaxft.train --config=configs/demo.py:labeled_pair     # -> runs/demo_labeled_pair
    python -m jaxft.train --config=configs/demo.py:classification \\
        --config.train.init_from=runs/demo                          # fine-tune the pre-trained one
"""
from configs import common

VARIANTS = ('next_token', 'labeled_pair', 'classification')


def get_config(arg=None):
  """`arg` picks the objective: configs/demo.py:labeled_pair (default next_token)."""
  c = common.get_config()
  if arg not in (None,) + VARIANTS:
    raise ValueError(f'configs/demo.py has no variant {arg!r}; known: {", ".join(VARIANTS)}')
  c.objective = arg or 'next_token'
  c.data.source = 'demo'
  c.data.seq_len = 128
  c.data.label_names = 'low,mid,high'
  c.train.steps = 400
  c.train.eval_every = 100
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 30
  c.checkpoint.every = 100
  if arg == 'classification':
    c.data.text_field = 'prompt'  # The question only: the model must work the answer out.
    c.data.seq_len = 16
  return c
