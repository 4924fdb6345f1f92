"""Benchmark the train step: tokens/s, step time, model FLOP/s and peak memory for a config.

    python -m jaxft.bench --config=configs/demo.py [--config.key=value ...] [--steps=20]
    python -m jaxft.bench --config=configs/demo.py --decode [--batch=1 --prompt-len=64 --new=64]

The train step runs on random text encoded by the run's objective into full rows; the input
pipeline (`input`: reading and checking the records, then the TrainStream's batches, tokenized
and packed as drawn) is measured apart on the config's own data, with its speed relative to
training's (`input_vs_train`: batches delivered per batch trained). Prints one JSON line.
"""
import json
import resource
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxft import config as config_lib, data, evaluate, generate, model as model_lib, objectives, \
    optim, sharding, tokenizer as tokenizer_lib, train


def step_flops(model_cfg, batch, seq_len):
  """Matmul FLOPs of one train step (forward + backward = 3x forward), as in the PaLM appendix."""
  D, F, L, V = model_cfg.embed_dim, model_cfg.mlp_dim, model_cfg.num_layers, model_cfg.vocab_size
  per_token = L * (2 * 4 * D * D + 2 * 2 * D * F + 2 * 2 * seq_len * D) + 2 * D * V
  return 3 * per_token * batch * seq_len


def synthetic_batch(objective, tok, data_cfg, batch_size):
  """A batch of full rows: one random seq_len-character text per row (half prompt, half
  completion for labeled_pair), encoded by the objective."""
  rng = np.random.default_rng(0)
  T = data_cfg.seq_len
  records = []
  for i in range(batch_size):
    text = ''.join(chr(c) for c in rng.integers(ord('a'), ord('z') + 1, T))
    records.append(({data_cfg.text_field: text, data_cfg.prompt_field: text[:T // 2],
                     data_cfg.completion_field: text[T // 2:], data_cfg.label_field: 0},
                    f'bench:{i}'))
  return {k: v[:batch_size] for k, v in objective.encode(records, tok, data_cfg).items()}


def bench(cfg, steps):
  mesh = sharding.make_mesh(cfg.mesh)
  tok = tokenizer_lib.build(cfg.tokenizer)
  objective = objectives.get(cfg.objective)
  model_cfg = objectives.model_config(cfg, tok)
  tx, lr = optim.build(cfg.optim, cfg.train.steps)
  graphdef, _, _, init_fn = train.build_state(cfg, model_cfg, tx, mesh)
  state = init_fn()
  step_fn = train.make_train_step(graphdef, objective, tx, lr, cfg.train.grad_accum)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  batch = sharding.shard_batch(synthetic_batch(objective, tok, cfg.data, B), mesh)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps
  flops = step_flops(model_cfg, B, T)
  mem = jax.devices()[0].memory_stats() or {}
  return {
      'platform': jax.devices()[0].platform, 'devices': jax.device_count(),
      'mesh': dict(mesh.shape), 'model': model_cfg.__dict__,
      'batch_size': B, 'seq_len': T, 'grad_accum': cfg.train.grad_accum,
      'compile_s': round(compile_s, 2), 'step_s': round(step_s, 4),
      'tokens_per_s': round(B * T / step_s, 1), 'model_tflops_per_s': round(flops / step_s / 1e12, 4),
      'peak_device_bytes': mem.get('peak_bytes_in_use'),
      'peak_host_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }


def bench_input(cfg, batches=200):
  """The trainer's input path on the config's own data: records read (or generated) and checked
  (once per run), then the TrainStream's batches, tokenized and packed as they are drawn."""
  tok = tokenizer_lib.build(cfg.tokenizer)
  objective = objectives.get(cfg.objective)
  t0 = time.perf_counter()
  records = objective.check(data.load_splits(cfg.data, cfg.seed)['train'], cfg.data)
  t1 = time.perf_counter()
  stream = objective.stream(records, tok, cfg.data, cfg.train.batch_size, cfg.seed)
  real = 0
  for _ in range(batches):
    real += int((next(stream)['segment_ids'] > 0).sum())
  t2 = time.perf_counter()
  used = sum(k for _, k, _, _ in stream.get_state()['slots'])  # Records drawn (and tokenized).
  return {'records': len(records), 'read_s': round(t1 - t0, 3),
          'records_per_s': round(used / (t2 - t1), 1),
          'batches_per_s': round(batches / (t2 - t1), 1),
          'batch_tokens_per_s': round(real / (t2 - t1), 1)}


def timed(fn, *args):
  """(seconds of the first call, incl. compilation; seconds of the second call)."""
  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def bench_decode(cfg, batch, prompt_len, new):
  """Greedy decoding of `new` tokens after random `prompt_len`-token prompts: jaxft.generate's
  KV cache against a full forward pass per token (evaluate.greedy), on a random model."""
  mesh = sharding.make_mesh(cfg.mesh)
  tok = tokenizer_lib.build(cfg.tokenizer)
  model_cfg = objectives.model_config(cfg, tok)
  with sharding.activate(mesh):
    model = model_lib.GPT(model_cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  prompts = np.random.default_rng(0).integers(0, 256, (batch, prompt_len)).astype(np.int32)
  lengths = np.full((batch,), prompt_len, np.int32)
  never = -1  # No EOS: every run decodes exactly `new` tokens.
  cached = generate.make_generate(graphdef, never, new)
  buf = np.concatenate([prompts, np.zeros((batch, new), np.int32)], 1)
  full = jax.jit(lambda p, t, n: evaluate.greedy(nnx.merge(graphdef, p), t, n, new))
  key = jax.random.key(0)
  (c_first, c_s), (f_first, f_s) = timed(cached, params, prompts, lengths, key), \
      timed(full, params, buf, lengths)
  return {'platform': jax.devices()[0].platform, 'model': model_cfg.__dict__, 'batch': batch,
          'prompt_len': prompt_len, 'new_tokens': new,
          'kv_cache': {'compile_s': round(c_first - c_s, 2), 's': round(c_s, 3),
                       'tokens_per_s': round(batch * new / c_s, 1)},
          'full_forward': {'compile_s': round(f_first - f_s, 2), 's': round(f_s, 3),
                           'tokens_per_s': round(batch * new / f_s, 1)}}


def main(argv):
  opts = {'steps': 20, 'batch': 1, 'prompt-len': 64, 'new': 64}
  rest, decode = [], False
  for a in argv:
    name, _, value = a[2:].partition('=')
    if a == '--decode':
      decode = True
    elif name in opts:
      opts[name] = int(value)
    else:
      rest.append(a)
  cfg, _ = config_lib.parse_args(rest)
  if decode:
    print(json.dumps(bench_decode(cfg, opts['batch'], opts['prompt-len'], opts['new'])))
  else:
    result = bench(cfg, opts['steps'])
    result['input'] = bench_input(cfg)
    # How many times faster than training consumes them the input path delivers batches
    # (records tokenized and packed on the fly, as in training).
    result['input_vs_train'] = round(result['input']['batches_per_s'] * result['step_s'], 1)
    print(json.dumps(result))


if __name__ == '__main__':
  main(sys.argv[1:])
