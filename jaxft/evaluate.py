"""Held-out evaluation per objective: statistics summed over a split, then the objective's metrics.

next_token: loss, perplexity; labeled_pair: completion loss, perplexity and exact match of greedy
completions (on the first `exact_match_examples` of the split); classification: loss, accuracy,
macro-F1 and the confusion matrix. Padding rows carry no weight, so every number is exact.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import data, objectives, sharding


def greedy(model, tokens_BL, prompt_len_B, num_new):
  """[batch, num_new] greedy continuations of right-padded prompts (full forward per token; the
  KV-cached decoder is jaxft.generate's business)."""
  rows = jnp.arange(tokens_BL.shape[0])

  def step(i, carry):
    tokens_BL, out_BN = carry
    hidden_BLD = model.hidden(tokens_BL)
    h_B1D = hidden_BLD[rows, prompt_len_B + i - 1][:, None]
    next_B = jnp.argmax(model.logits(h_B1D)[:, 0], -1).astype(tokens_BL.dtype)
    return (tokens_BL.at[rows, prompt_len_B + i].set(next_B, mode='drop'),
            out_BN.at[:, i].set(next_B))

  out_BN = jnp.zeros((tokens_BL.shape[0], num_new), tokens_BL.dtype)
  return jax.lax.fori_loop(0, num_new, step, (tokens_BL, out_BN))[1]


def exact_match_examples(records, tok, data_cfg, pad_id):
  """Prompt buffers and references for greedy exact match, as arrays over `records`."""
  pairs = [objectives.prompt_completion_ids(rec, where, tok, data_cfg) for rec, where in records]
  pairs = [(p, c) for p, c in pairs if c]
  length = max(len(p) + len(c) - 1 for p, c in pairs)
  num_new = max(len(c) for _, c in pairs)
  out = {'tokens': np.full((len(pairs), length), pad_id, np.int32),
         'prompt_len': np.array([len(p) for p, _ in pairs], np.int32),
         'reference': np.full((len(pairs), num_new), pad_id, np.int32),
         'reference_len': np.array([len(c) for _, c in pairs], np.int32),
         'loss_mask': np.ones((len(pairs),), np.float32)}
  for i, (p, c) in enumerate(pairs):
    out['tokens'][i, :len(p)] = p
    out['reference'][i, :len(c)] = c
  return out


class Evaluator:
  """Evaluates params on the splits of one run; jitted steps are built once per objective."""

  def __init__(self, graphdef, objective, examples, records, tok, cfg, mesh):
    self.objective, self.examples, self.mesh = objective, examples, mesh
    self.batch_size = cfg.train.batch_size
    self.sums_step = jax.jit(lambda params, batch: objective.eval_sums(
        nnx.merge(graphdef, params), batch))
    self.pairs = {}
    n = cfg.train.exact_match_examples if objective.name == 'labeled_pair' else 0
    if n:
      self.pairs = {s: exact_match_examples(r[:n], tok, cfg.data, tok.pad_id)
                    for s, r in records.items() if s != 'train'}

    def match_step(params, batch):
      out_BN = greedy(nnx.merge(graphdef, params), batch['tokens'], batch['prompt_len'],
                      batch['reference'].shape[1])
      pending_BN = jnp.arange(out_BN.shape[1]) < batch['reference_len'][:, None]
      same_B = jnp.all((out_BN == batch['reference']) | ~pending_BN, axis=1)
      return {'matches': jnp.sum(same_B * batch['loss_mask']), 'count': jnp.sum(batch['loss_mask'])}
    self.match_step = jax.jit(match_step)

  def _sums(self, step_fn, params, examples, max_batches):
    sums = {}
    for batch in data.eval_batches(examples, self.batch_size, max_batches):
      out = jax.device_get(step_fn(params, sharding.shard_batch(batch, self.mesh)))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
    return sums

  def __call__(self, params, split, max_batches=0):
    """The objective's metrics on (at most max_batches batches of) `split`."""
    sums = self._sums(self.sums_step, params, self.examples[split], max_batches)
    if sums['count'] == 0:
      raise data.DataError(f'evaluation split {split!r} has no supervised token')
    metrics = {**self.objective.metrics(sums), 'supervised_tokens': int(sums['count'])}
    if split in self.pairs:
      metrics['exact_match'], metrics['exact_match_examples'] = self.exact_match(
          params, self.pairs[split])
    return metrics

  def exact_match(self, params, pairs):
    """(fraction of greedy completions equal to the reference, EOS included; examples scored)
    for arrays from exact_match_examples."""
    sums = self._sums(self.match_step, params, pairs, 0)
    return float(sums['matches'] / sums['count']), int(sums['count'])
