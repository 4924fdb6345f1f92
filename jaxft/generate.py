"""Text generation from a run's checkpoint: jitted KV-cache decoding (prefill, then one token a step).

    python -m jaxft.generate --workdir runs/demo --prompt '23+58='
    python -m jaxft.generate --workdir runs/demo --prompts-file prompts.jsonl --out out.jsonl \\
        [--max-new-tokens 32 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0 --num-samples 4]
        [--batch-size 32]
        [--config.mesh.data=1 ...]   # evaluate's overrides: e.g. a mesh for the devices here

Prompts of different lengths share a batch of --batch-size rows (right-padded; each row decodes
from its own length) and stop at EOS; a row's samples are the same whatever the batch size or
mesh. Works for next_token and labeled_pair runs and for `convert from-hf` workdirs.
"""
import argparse
import gzip
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import checkpoint, config as config_lib, data, evaluate, objectives, sharding


def sample(logits_BV, keys_B, temperature, top_k, top_p):
  """Next tokens [batch]: greedy at temperature 0, else sampled from the temperature-scaled
  distribution cut to the top_k tokens (0: all) and the top_p probability mass (1: all), each row
  with its own key (a row's draws do not depend on the rows beside it)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, -1)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1:
    sorted_BV = jnp.sort(logits_BV, -1)[:, ::-1]
    mass_before_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, -1), -1) - jax.nn.softmax(sorted_BV, -1)
    keep_BV = mass_before_BV < top_p  # The most likely token is always kept.
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), -1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV)


def make_generate(graphdef, eos_id, max_new, temperature=0.0, top_k=0, top_p=1.0):
  """jitted generate(params, prompts [B, P] right-padded, prompt lengths [B], keys [B]) -> new
  tokens [B, max_new] (EOS after a row has finished). Stops early once every row has hit EOS.
  Row b samples its i-th token with fold_in(keys[b], i)."""

  @jax.jit
  def generate(params, prompts_BP, prompt_len_B, keys_B):
    model = nnx.merge(graphdef, params)
    B, P = prompts_BP.shape
    cache = model.init_cache(B, P + max_new)
    hidden_BPD, cache = model.extend(prompts_BP, jnp.zeros((B,), jnp.int32), cache)
    last_B1D = hidden_BPD[jnp.arange(B), prompt_len_B - 1][:, None]
    logits_BV = model.logits(last_B1D)[:, 0]

    def unfinished(carry):
      i, _, _, done_B, _ = carry
      return (i < max_new) & ~jnp.all(done_B)

    def step(carry):
      i, logits_BV, cache, done_B, out_BN = carry
      step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, i)
      token_B = sample(logits_BV, step_keys_B, temperature, top_k, top_p)
      token_B = jnp.where(done_B, eos_id, token_B).astype(jnp.int32)
      hidden_B1D, cache = model.extend(token_B[:, None], prompt_len_B + i, cache)
      return (i + 1, model.logits(hidden_B1D)[:, 0], cache, done_B | (token_B == eos_id),
              out_BN.at[:, i].set(token_B))

    out_BN = jnp.full((B, max_new), eos_id, jnp.int32)
    carry = (0, logits_BV, cache, jnp.zeros((B,), bool), out_BN)
    return jax.lax.while_loop(unfinished, step, carry)[-1]

  return generate


def pad_prompts(prompts, pad_id, multiple, width=None):
  """Token lists -> (right-padded [rows, width or the longest] array, lengths); rows padded to a
  multiple with copies of the first prompt (their outputs are dropped)."""
  rows = -(-len(prompts) // multiple) * multiple
  prompts = prompts + [prompts[0]] * (rows - len(prompts))
  out = np.full((rows, width or max(map(len, prompts))), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return out, np.array([len(p) for p in prompts], np.int32)


def main(argv):
  parser = argparse.ArgumentParser(prog='python -m jaxft.generate')
  parser.add_argument('--workdir', required=True, help='run directory (or convert from-hf output)')
  parser.add_argument('--step', type=int, help='checkpoint step (default: latest)')
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--prompt', help='one prompt')
  src.add_argument('--prompts-file', help='.jsonl with a "prompt" field per line')
  parser.add_argument('--out', help='JSONL output for --prompts-file (default: stdout)')
  parser.add_argument('--max-new-tokens', type=int, default=32)
  parser.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  parser.add_argument('--top-k', type=int, default=0)
  parser.add_argument('--top-p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num-samples', type=int, default=1)
  parser.add_argument('--batch-size', type=int, default=32,
                      help='rows (prompts x samples) decoded at once; the same samples for any')
  parser.add_argument('--raw', action='store_true', help="labeled_pair runs: prompts as written, "
                      "not through the run's data.prompt_template")
  # Also --config.mesh.* (e.g. fewer devices than the run had) and --config.data.*, as evaluate.
  args, rest = parser.parse_known_args(config_lib.equals_form(argv))
  overrides = evaluate.overrides_of(rest, parser)
  # A finite temperature: at inf every logit, the padding ids' -1e9 too, divides to 0 (uniform).
  ranges = [('--temperature', args.temperature, 0 <= args.temperature < math.inf,
             'finite, >= 0 (0: greedy)'),
            ('--top-k', args.top_k, args.top_k >= 0, '>= 0 (0: all)'),
            ('--top-p', args.top_p, 0 < args.top_p <= 1, 'in (0, 1]'),
            ('--max-new-tokens', args.max_new_tokens, args.max_new_tokens >= 1, '>= 1'),
            ('--num-samples', args.num_samples, args.num_samples >= 1, '>= 1'),
            ('--batch-size', args.batch_size, args.batch_size >= 1, '>= 1')]
  bad = [f'{flag} {value} (must be {want})' for flag, value, ok, want in ranges if not ok]
  if bad:
    raise config_lib.ConfigError('out of range: ' + '; '.join(bad))
  sampling = [f for f, on in (('--top-k', args.top_k), ('--top-p', args.top_p < 1),
                              ('--num-samples', args.num_samples > 1)) if on]
  if sampling and args.temperature == 0:  # Greedy decoding would ignore them (or repeat itself).
    raise config_lib.ConfigError(f'{", ".join(sampling)}: sampling options, but --temperature 0 '
                                 f'(the default) decodes greedily: give --temperature > 0')
  # Checked before any decoding. A ~ no shell expanded (--out=~/out.jsonl) is the home directory.
  out_path = checkpoint.absolute(args.out) if args.out else None
  if out_path and out_path.is_dir():
    raise IsADirectoryError(f'--out {args.out} is a directory; give a file name')
  if out_path and args.prompts_file and any(os.path.realpath(f) == os.path.realpath(out_path)
                                       for f in data._files(args.prompts_file)):
    raise FileExistsError(f'--out {args.out} is the --prompts-file: writing it would replace '
                          f'the prompts')
  cfg = checkpoint.run_config(args.workdir)[0]
  if objectives.get(cfg.objective).has_head:
    raise config_lib.ConfigError(f'{args.workdir} is a {cfg.objective} run: its outputs are '
                                 f'class scores (python -m jaxft.evaluate), not text')
  cfg, tok, model_cfg, graphdef, params = evaluate.load(args.workdir, args.step,
                                                        overrides=overrides)
  if args.top_k > tok.vocab_size:
    raise config_lib.ConfigError(f'--top-k {args.top_k} > the tokenizer\'s {tok.vocab_size} ids')
  mesh = sharding.make_mesh(cfg.mesh)
  pair = cfg.objective == 'labeled_pair'
  if args.raw and not pair:  # (It would change nothing: a next_token run has no template.)
    raise config_lib.ConfigError(f'--raw skips a labeled_pair run\'s data.prompt_template; '
                                 f'{args.workdir} is a {cfg.objective} run, whose prompts are '
                                 f'always as written')
  if args.prompt is not None:
    records = [({'prompt': args.prompt}, '--prompt')]
    field = 'prompt'
  else:
    records = data.read_records(args.prompts_file)
    field = cfg.data.prompt_field if pair else 'prompt'  # A pair run reads its own data's field.
  texts = [objectives.string_field(r, field, where) for r, where in records]
  # As in training and evaluation: a pair run was trained on its prompts shown through the template.
  shown = [objectives.shown_prompt(t, cfg.data) if pair and not args.raw else t for t in texts]
  encoded = [tok.encode(t) or [tok.eos_id] for t in shown]
  # Named (the file's line, or --prompt), all counted: one fix, not one rerun per long prompt.
  over = [(where, len(p)) for (_, where), p in zip(records, encoded)
          if len(p) + args.max_new_tokens > model_cfg.max_len]
  if over:
    more = f' (and {len(over) - 1} more over the limit)' if len(over) > 1 else ''
    raise config_lib.ConfigError(f'{over[0][0]}: prompt of {over[0][1]} tokens + --max-new-tokens '
                                 f'{args.max_new_tokens} > model max_len {model_cfg.max_len}{more}')
  prompts = [p for p in encoded for _ in range(args.num_samples)]
  longest = max(map(len, prompts))
  generate = make_generate(graphdef, tok.eos_id, args.max_new_tokens, args.temperature,
                           args.top_k, args.top_p)
  # Every call [rows, longest] (one compile): --batch-size rows, rounded up to the mesh's batch
  # shards, or all rows when fewer. Row r samples with fold_in(seed's key, r) wherever it falls.
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  rows = -(-min(args.batch_size, len(prompts)) // shards) * shards
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(args.seed),
                                                      jnp.arange(len(prompts) + rows))
  new = []
  for start in range(0, len(prompts), rows):
    chunk = prompts[start:start + rows]
    tokens, lengths = pad_prompts(chunk, tok.pad_id, rows, longest)
    batch = sharding.shard_batch({'tokens': tokens, 'lengths': lengths}, mesh)
    out = generate(params, batch['tokens'], batch['lengths'], row_keys[start:start + rows])
    new += [ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
            for ids in np.asarray(jax.device_get(out))[:len(chunk)].tolist()]
  pairs = [(t, s) for t, s in zip(texts, shown) for _ in range(args.num_samples)]
  if args.prompt is not None and not args.out:
    for (_, seen), ids in zip(pairs, new):
      print(seen + tok.decode(ids))
    return
  lines = ''.join(json.dumps({'prompt': text, 'sample': i % args.num_samples,
                              'completion': tok.decode(ids)}) + '\n'
                  for i, ((text, _), ids) in enumerate(zip(pairs, new)))
  if out_path:  # Written whole, or an existing file left as it was; gzip'ed as a .gz name says.
    config_lib.write_file(str(out_path.parent), out_path.name, gzip.compress(lines.encode())
                          if out_path.name.endswith('.gz') else lines)
  else:
    sys.stdout.write(lines)


if __name__ == '__main__':
  from jaxft import cli
  cli.run(main)
