"""Held-out evaluation: the objective's loss summed over a split (padding rows carry no loss)."""
import math

import jax
from flax import nnx

from jaxft import data, sharding


def make_eval_step(graphdef, objective):
  @jax.jit
  def eval_step(params, batch):
    return objective.loss(nnx.merge(graphdef, params), batch, None)
  return eval_step


def evaluate(eval_step, params, examples, batch_size, mesh, max_batches=0):
  """{'loss', 'perplexity', 'supervised_tokens'} over (at most max_batches batches of) a split."""
  total, count = 0.0, 0.0
  for batch in data.eval_batches(examples, batch_size, max_batches):
    s, c = jax.device_get(eval_step(params, sharding.shard_batch(batch, mesh)))
    total, count = total + float(s), count + float(c)
  if count == 0:
    raise data.DataError('evaluation split has no supervised tokens')
  loss = total / count
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'supervised_tokens': int(count)}
