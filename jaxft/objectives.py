"""Objectives as data: each one turns records into fixed-shape example arrays and defines a loss.

Every objective's examples carry `tokens`, `targets` and `loss_mask` ([examples, seq_len]); the loss
returns (sum of per-token losses, number of supervised tokens) so that micro-batches, hosts and
eval batches add up exactly.
"""
import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np
import optax

from jaxft import data


def encode_next_token(records, tokenizer, data_cfg):
  """Pack all documents end to end (EOS between them) and cut windows of seq_len + 1 tokens."""
  T = data_cfg.seq_len
  stream = []
  for rec, where in records:
    text = data.field(rec, data_cfg.text_field, where)
    if not isinstance(text, str):
      raise data.DataError(f'{where}: field {data_cfg.text_field!r} must be a string, '
                           f'got {type(text).__name__}')
    stream += tokenizer.encode(text) + [tokenizer.eos_id]
  num = (len(stream) - 1) // T
  if num == 0:
    first = records[0][1] if records else 'no records'
    raise data.DataError(f'{len(stream)} tokens (from {first} on) are fewer than one sequence of '
                         f'data.seq_len + 1 = {T + 1}')
  stream = np.asarray(stream[:num * T + 1], np.int32)
  return {
      'tokens': stream[:-1].reshape(num, T),
      'targets': stream[1:].reshape(num, T),
      'loss_mask': np.ones((num, T), np.float32),
  }


def token_loss(model, batch, dropout_key=None):
  """Masked next-token cross-entropy: (sum over supervised tokens, number of them)."""
  logits_BLV = model(batch['tokens'], dropout_key=dropout_key)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch['targets'])
  mask_BL = batch['loss_mask']
  return jnp.sum(ce_BL * mask_BL), jnp.sum(mask_BL)


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  encode: Callable  # (records, tokenizer, data_cfg) -> {name: np.ndarray [examples, ...]}
  loss: Callable  # (model, batch, dropout_key) -> (loss_sum, supervised_tokens)


OBJECTIVES = {
    'next_token': Objective('next_token', encode_next_token, token_loss),
}


def get(name):
  if name not in OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}; known: {", ".join(OBJECTIVES)}')
  return OBJECTIVES[name]
