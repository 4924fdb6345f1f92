"""Held-out evaluation per objective: statistics summed over a split, then the objective's metrics.

    python -m jaxft.evaluate --workdir runs/demo_labeled_pair --split test [--step 300]
        [--config.data.test=other.jsonl ...]   # other data (EVAL_OVERRIDES); own report file

next_token: loss, perplexity; labeled_pair: completion loss, perplexity and exact match of greedy
completions (on the first `exact_match_examples` of the split); classification: loss, accuracy,
macro-F1 and the confusion matrix. Padding rows carry no weight, so every number is exact.
"""
import argparse
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jaxft import checkpoint, config as config_lib, convert, data, objectives, sharding, \
    tokenizer as tokenizer_lib


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
  pairs = []
  for rec, where in records:  # A bad record is left out as from training (data.on_error=skip).
    with data.bad_records(data_cfg.on_error, []):
      pairs.append(objectives.prompt_completion_ids(rec, where, tok, data_cfg))
  pairs = [(p, c) for p, c in pairs if c]
  if not pairs:  # (data.drop_unsupervised: every one left without a completion.)
    raise data.DataError(f'train.exact_match_examples: none of the first {len(records)} records '
                         f'keeps a completion within data.seq_len={data_cfg.seq_len}')
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
      self.pairs = {s: exact_match_examples(records[s][:n], tok, cfg.data, tok.pad_id)
                    for s in examples}

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

  def loss(self, params, split, max_batches=0):
    """The loss alone on (at most max_batches batches of) `split`."""
    sums = self._sums(self.sums_step, params, self.examples[split], max_batches)
    return self.objective.metrics(sums)['loss']

  def exact_match(self, params, pairs):
    """(fraction of greedy completions equal to the reference, EOS included; examples scored)
    for arrays from exact_match_examples."""
    sums = self._sums(self.match_step, params, pairs, 0)
    return float(sums['matches'] / sums['count']), int(sums['count'])


def write_report(workdir, cfg, step, split, metrics, baselines, max_batches=0, overrides=None):
  """<workdir>/eval/<split>_<step>.json: the metrics beside the split's trivial baselines (and
  the config overrides they were measured with, if any)."""
  extra = {'overrides': overrides} if overrides else {}
  if objectives.get(cfg.objective).has_head:
    extra['label_names'] = objectives.labels(cfg.data)[1]
  name = f'eval/{split}_{step}.json'
  config_lib.write_file(workdir, name, json.dumps(
      {'step': step, 'split': split, 'objective': cfg.objective, 'metrics': metrics,
       'baselines': baselines, 'batches': max_batches or 'all', **extra}, indent=1))
  return epath.Path(workdir) / name


# What `evaluate --config.key=value` may change: the data and how it is read and scored, and
# the mesh; the model is the checkpoint's.
EVAL_OVERRIDES = ('data.', 'train.eval_batches', 'train.exact_match_examples', 'mesh.')


def overrides_of(rest, parser):
  """The (key, text) pairs of the --config.key=value arguments argparse left over; any other
  left-over argument is an error."""
  overrides = [a[len('--config.'):].split('=', 1) for a in rest if a.startswith('--config.')]
  if len(overrides) < len(rest) or any(len(o) < 2 for o in overrides):
    parser.error(f'unrecognized arguments: {" ".join(rest)} (overrides: --config.key=value)')
  return overrides


def load(workdir, step=None, mesh=None, overrides=()):
  """(config, tokenizer, GPTConfig, graphdef, params on `mesh`) of a run's checkpoint, with
  `overrides` ((key, text) pairs within EVAL_OVERRIDES) applied to the run's config."""
  if step is not None:
    workdir = checkpoint.resolve(workdir)[0] / str(step)
  cfg, directory, step = checkpoint.run_config(workdir)
  classes = lambda: objectives.labels(cfg.data)[1] if cfg.objective == 'classification' else None
  trained = classes()  # (Before the overrides.)
  for key, text in overrides:
    if not config_lib.within(key, EVAL_OVERRIDES):
      raise config_lib.ConfigError(f'--config.{key}: evaluation takes only '
                                   f'{", ".join(EVAL_OVERRIDES)} (the model is the checkpoint\'s)')
    config_lib.override(cfg, key, text)
  config_lib.check(cfg)
  now = classes()
  if trained and now != trained and sorted(now) == sorted(trained):
    raise config_lib.ConfigError(f'data.label_names {now} reorders the run\'s classes '
                                 f'{trained}: the head scores them in the run\'s order')
  tok = tokenizer_lib.build(cfg.tokenizer)
  convert.check_tokenizer(cfg, tok, directory, step)
  model_cfg = objectives.model_config(cfg, tok)
  objectives.check_positions(cfg, model_cfg)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  graphdef, abstract = convert.abstract_model(model_cfg, mesh)
  params, _ = checkpoint.restore_params(directory / str(step), abstract,
                                        sharding.state_shardings(abstract, mesh), new_ok=None)
  return cfg, tok, model_cfg, graphdef, params


def main(argv):
  parser = argparse.ArgumentParser(prog='python -m jaxft.evaluate')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--split', default='test', choices=('train', 'val', 'test'))
  parser.add_argument('--step', type=int, help='checkpoint step (default: latest)')
  parser.add_argument('--objective', help='judge by another objective with the same model, e.g. '
                      'a next_token run by labeled_pair exact match (default: the run\'s)')
  args, rest = parser.parse_known_args(config_lib.equals_form(argv))
  overrides = overrides_of(rest, parser)
  cfg, tok, _, graphdef, params = load(args.workdir, args.step, overrides=overrides)
  # --workdir may name the checkpoints/ dir or a step in it: reports go to the run's workdir,
  # never into a checkpoint.
  directory, latest = checkpoint.resolve(args.workdir)
  step = args.step if args.step is not None else latest
  if args.objective:
    if objectives.get(args.objective).has_head != objectives.get(cfg.objective).has_head:
      raise config_lib.ConfigError(f'--objective {args.objective} needs a different model head '
                                   f'than the run\'s {cfg.objective}')
    cfg.objective = args.objective
  objective = objectives.get(cfg.objective)
  # A dataset's train split stays unread (as in training) unless it is the one evaluated: the
  # baselines read only its first records.
  records = {s: r if s == 'train' != args.split and r.lazy else objective.check(r, cfg.data)
             for s, r in data.load_splits(cfg.data).items()}
  examples = {args.split: objective.encode(records[args.split], tok, cfg.data)}
  evaluator = Evaluator(graphdef, objective, examples, records, tok, cfg,
                        sharding.make_mesh(cfg.mesh))
  # The whole split, unless --config.train.eval_batches caps it as training's evaluations do.
  max_batches = cfg.train.eval_batches if 'train.eval_batches' in dict(overrides) else 0
  metrics = evaluator(params, args.split, max_batches)
  baselines = objectives.baselines(objective, records['train'], records[args.split],
                                   examples[args.split], tok, cfg.data,
                                   cfg.train.exact_match_examples)
  split = args.split if not args.objective else f'{args.split}_as_{args.objective}'
  if overrides:  # Other data than the run's: a report of its own, not the run's overwritten.
    split += '_' + hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:8]
  path = write_report(directory.parent, cfg, step, split, metrics, baselines, max_batches,
                      overrides=dict(overrides))
  print(f'{cfg.objective} on {args.split} at step {step}:')
  for k, v in {**metrics, **{f'baseline {k}': v for k, v in baselines.items()}}.items():
    if k == 'confusion':
      print(f'  {"confusion (rows: true, cols: predicted)":40s}')
      for name, row in zip(objectives.labels(cfg.data)[1], v):
        print(f'    {name:>12s} ' + ' '.join(f'{n:6d}' for n in row))
    else:
      print(f'  {k:40s} {v:.4f}' if isinstance(v, float) else f'  {k:40s} {v}')
  print(f'wrote {path}')


if __name__ == '__main__':
  from jaxft import cli
  cli.run(main)
