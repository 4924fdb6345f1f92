"""Benchmark the train step: tokens/s, step time, compile time, MFU and memory for any config.

    python -m jaxft.bench --config=configs/demo.py [--config.key=value ...] [--steps=20]
        [--warmup=2] [--compare-hf] [--json=out.json] [--no-input] [--compile-only]
    python -m jaxft.bench --config=configs/demo.py --target=h100 [or h200, h100:8, v5e:2x2, v5p]
    python -m jaxft.bench --config=configs/demo.py --decode [--batch=1 --prompt-len=64 --new=64]

The train step runs on random text encoded by the run's objective into full rows. Step times are
the median and spread of `--steps` timed steps after `--warmup` untimed ones; compilation is
timed on its own. MFU counts 6N + 12LHQT FLOPs per token (PaLM, appendix B) over the device's
peak: a datasheet figure on GPU/TPU, a matmul probe run here on CPU. `--compare-hf` trains
transformers' GPT2LMHeadModel (GPT2ForSequenceClassification for classification) with torch
AdamW on the same architecture, batch and dtype in the same process, alternating rounds of steps
with jaxft's so that both see the same machine, and prints the ratio. The input pipeline (`input`:
reading and checking the records, then the TrainStream's batches, tokenized and packed as drawn)
is measured apart on the config's own data, relative to training (`input_vs_train`: batches
delivered per batch trained). `--compile-only` compiles the step against the abstract state and
reports XLA's memory plan per device without allocating anything: will a config fit?
`--target` compiles it with XLA's compiler for a chip this machine does not have (TARGETS; needs
the `aot` extra): the plan an H100 or a TPU slice would run, from a CPU box. Prints a summary and
one JSON line (also written to --json).
"""
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jaxft import config as config_lib, data, evaluate, generate, model as model_lib, objectives, \
    optim, sharding, tokenizer as tokenizer_lib, train

# Dense bf16 (and fp16: the same rate on these chips) peak FLOP/s per chip from the vendors'
# datasheets, by jax device_kind substring (longest match wins). float32 compute is counted
# against half of it (TF32 on NVIDIA tensor cores, bf16 passes on TPU).
DATASHEET_PEAK = {
    'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'A100': 312e12, 'L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12,
}


# Chips to plan for without having one (--target). A GPU is described to XLA's GPU compiler by a
# GpuTargetConfig (the jax-cuda12 plugin): (device name, memory as the driver reports it, SMs,
# memory bandwidth, L2 bytes), all sm_90. A TPU slice comes from libtpu's topologies: (default
# single-chip topology, HBM per chip as the TPU compiler counts it, in GiB).
GPU_TARGETS = {
    'h100': ('NVIDIA H100 80GB HBM3', 84_942_979_072, 132, 3.35e12, 50 * 2 ** 20),
    'h200': ('NVIDIA H200', 150_754_820_096, 132, 4.8e12, 50 * 2 ** 20),
}
TPU_TARGETS = {'v5e': ('1x1', 15.75), 'v5p': ('1x1x1', 95.74), 'v6e': ('1x1', 31.25)}
# Of a GPU's memory, what a step may plan on: what JAX's allocator takes at
# XLA_PYTHON_CLIENT_MEM_FRACTION=.95, leaving the rest to the CUDA context and libraries.
GPU_MEM_FRACTION = 0.95


def gpu_target_config(name, memory, sms, bandwidth, l2):
  """GpuTargetConfigProto text for a Hopper GPU (the per-SM limits are sm_90's)."""
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048
  shared_memory_per_block: 49152  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472  registers_per_core_limit: 65536
  registers_per_block_limit: 65536  core_count: {sms}  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}  l2_cache_size: {l2}  clock_rate_ghz: 1.98
  device_memory_size: {memory}  cuda_compute_capability {{ major: 9 }}
}}
platform_name: "CUDA"  dnn_version_info {{ major: 9 minor: 10 }}  device_description_str: "{name}"
"""


def target_devices(target):
  """(compile-only devices, bytes a step may plan on each) for --target: 'h100' or 'h100:8' (one
  host's GPUs), 'v5e' or 'v5e:2x2' (a TPU slice's topology)."""
  from jax.experimental import topologies
  kind, _, shape = target.partition(':')
  if kind in GPU_TARGETS:
    desc = GPU_TARGETS[kind]
    topo = topologies.get_topology_desc(platform='cuda', target_config=gpu_target_config(*desc),
                                        topology=f'1x1x{shape or 1}')
    return topo.devices, int(desc[1] * GPU_MEM_FRACTION)
  if kind in TPU_TARGETS:
    single, hbm_gib = TPU_TARGETS[kind]
    bounds = {'chips_per_host_bounds': (1, 1, 1)} if not shape or shape == single else {}
    topo = topologies.get_topology_desc(platform='tpu', topology_name=f'{kind}:{shape or single}',
                                        **bounds)
    return topo.devices, int(hbm_gib * 2 ** 30)
  raise config_lib.ConfigError(f'unknown --target {target!r}; known: '
                               f'{", ".join([*GPU_TARGETS, *TPU_TARGETS])} (":N" GPUs, ":AxB" TPU '
                               f'topology)')


def flops_per_token(model_cfg, n_matmul_params, seq_len):
  """(FLOPs, formula text): 6N + 12·L·H·Q·T for one trained token (forward + backward); N counts
  the parameters that multiply activations (not the wpe lookup table; wte only as the LM head)."""
  L, H, Q, T = model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim, seq_len
  flops = 6 * n_matmul_params + 12 * L * H * Q * T
  return flops, (f'6N + 12LHQT = 6*{n_matmul_params:,} + 12*{L}*{H}*{Q}*{T} '
                 f'= {flops / 1e6:,.1f} MFLOP per token')


# The parts of a block in forward order (param paths 'h/<layer>/<part>...'), the attention core
# (no params) between the qkv projection and the output projection.
BLOCK_PARTS = ('ln_1', 'attn/c_attn', 'attn/core', 'attn/c_proj', 'ln_2', 'mlp/c_fc', 'mlp/c_proj')


def forward_position(path):
  """Where a param acts in the forward pass, as a sortable key: the embeddings (0,), block parts
  (1, layer, part), ln_f (2,), the output layer (wte as the LM head, or score) (3,)."""
  if path in ('wte', 'wpe'):
    return (0,)
  if path.startswith('h/'):
    _, layer, part = path.split('/', 2)
    return (1, int(layer), next(i for i, p in enumerate(BLOCK_PARTS) if part.startswith(p)))
  return (2,) if path.startswith('ln_f') else (3,)


def lookups(has_head):
  """The params that are table lookups, not matmuls (N leaves them out): wpe, and wte where a
  classification head (score) stands in for the LM head."""
  return {'wpe'} | ({'wte'} if has_head else set())


def frozen_flops_per_token(model_cfg, param_sizes, trainable, has_head, seq_len, spec):
  """flops_per_token when only some params train (train.trainable): every matmul runs forward
  (2 FLOPs per param), its weight gradient only for a trained param (2), its input gradient only
  above the lowest trained param (2): frozen params are stop_gradient'ed, so the backward ends
  there. The attention core: 4LHQT forward, 8HQT backward for each layer above that param."""
  L, H, Q, T = model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim, seq_len
  lowest = min((forward_position(p) for p in param_sizes if trainable(p)), default=(9,))
  n = n_trained = n_below = 0
  for path, size in param_sizes.items():
    if path in lookups(has_head):
      continue
    n += size
    n_trained += size if trainable(path) else 0
    n_below += size if lowest < ((3,) if path == 'wte' else forward_position(path)) else 0
  l_back = sum(lowest < (1, i, BLOCK_PARTS.index('attn/core')) for i in range(L))
  flops = 2 * (n + n_trained + n_below) + (4 * L + 8 * l_back) * H * Q * T
  return flops, (f'2N + 2N_trained + 2N_backward + (4L + 8L_backward)HQT (train.trainable='
                 f'{spec!r}: no weight gradient for frozen params, no backward below the lowest '
                 f'trained one) = 2*{n:,} + 2*{n_trained:,} + 2*{n_below:,} + (4*{L} + '
                 f'8*{l_back})*{H}*{Q}*{T} = {flops / 1e6:,.1f} MFLOP per token')


def best_seconds(fn, repeats=5):
  """The fastest of `repeats` timed calls of fn() (blocking), after one untimed call."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_probe(dtype, n=2048):
  """Best FLOP/s of an n x n x n jitted matmul on the first device, in the compute dtype."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / best_seconds(lambda: jax.block_until_ready(mm(a, a)))


def device_peak(dtype, devices=1):
  """(peak FLOP/s, where the figure comes from) of `devices` chips like the first device, in the
  compute dtype: tokens/s is the whole mesh's, so is the peak it is set against."""
  kind = jax.devices()[0].device_kind
  known = [k for k in DATASHEET_PEAK if k in kind]
  if known:
    peak = DATASHEET_PEAK[max(known, key=len)] * (0.5 if dtype == 'float32' else 1)
    return peak * devices, f'datasheet ({kind}, {dtype})' + (f' x {devices}' if devices > 1 else '')
  # CPUs (and chips not in the table): measured on the first device; a CPU's is all cores of
  # this process, which its devices share (one figure for the whole mesh).
  chips = 1 if jax.devices()[0].platform == 'cpu' else devices
  return matmul_probe(jnp.dtype(dtype)) * chips, (f'matmul probe ({kind}, {dtype}, 2048^3)'
                                                  + (f' x {chips}' if chips > 1 else ''))


def synthetic_batch(objective, tok, data_cfg, batch_size):
  """A batch of full rows: one random seq_len-character text per row (half prompt, half
  completion for labeled_pair), encoded by the objective."""
  rng = np.random.default_rng(0)
  T = data_cfg.seq_len
  records = []
  for i in range(batch_size):
    text = ''.join(chr(c) for c in rng.integers(ord('a'), ord('z') + 1, T))
    # Only the fields the objective reads: a text_field that is also the prompt_field (the demo's
    # classification reads 'prompt') would otherwise hold half a row.
    record = ({data_cfg.prompt_field: text[:T // 2], data_cfg.completion_field: text[T // 2:]}
              if objective.name == 'labeled_pair' else
              {data_cfg.text_field: text, data_cfg.label_field: 0})
    records.append((record, f'bench:{i}'))
  return {k: v[:batch_size] for k, v in objective.encode(records, tok, data_cfg).items()}


def progress(what):
  """A stage reached, on stderr as it happens: a run killed at its time limit (a lent
  machine's, say) still shows how far it got and what each stage took."""
  print(f'bench: {what}', file=sys.stderr, flush=True)


def jax_trainer(cfg, allocate=True, target=None):
  """(model config, (FLOPs per token, formula), step() running one blocking train step, compile
  report). The step is compiled against the abstract state, so `allocate=False` plans a config's
  memory without holding it (step is then None), and a `target` (see target_devices) plans it
  for another chip's compiler."""
  if target and cfg.optim.offload:
    raise config_lib.ConfigError(
        'optim.offload with --target: a compile-only target has no host memory, so its plan '
        'would hold the offloaded optimizer state on the device; plan it on the machine itself')
  devices, limit = target_devices(target) if target else (None, None)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  tok = tokenizer_lib.build(cfg.tokenizer)
  objective = objectives.get(cfg.objective)
  built = train.setup(cfg, tok, objective, mesh)
  n_matmul = sum(n for k, n in built.param_sizes.items() if k not in lookups(objective.has_head))
  counted = (flops_per_token(built.model_cfg, n_matmul, cfg.data.seq_len)
             if built.trainable is None else frozen_flops_per_token(
                 built.model_cfg, built.param_sizes, built.trainable, objective.has_head,
                 cfg.data.seq_len, cfg.train.trainable))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          built.abstract, built.shardings)
  batch = synthetic_batch(objective, tok, cfg.data, cfg.train.batch_size)
  batch = (sharding.shard_batch(batch, mesh) if allocate else
           {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
            for k, v in batch.items()})
  first = mesh.devices.flat[0]
  report = {'platform': first.platform, 'device_kind': first.device_kind, 'devices': mesh.size,
            'mesh': dict(mesh.shape), 'target': target}
  progress(f'compiling the train step ({first.device_kind})')
  t0 = time.perf_counter()
  try:
    compiled = built.train_step.lower(abstract, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    if not (target and 'RESOURCE_EXHAUSTED' in str(e)):
      raise
    # The TPU compiler refuses a program that exceeds HBM: that is the answer to "will it fit".
    return built.model_cfg, counted, None, {**report, **memory_report(None, built.abstract),
                                             'device_bytes_limit': limit, 'fits': False,
                                             'compile_error': str(e).splitlines()[0][:300]}
  report['compile_s'] = round(time.perf_counter() - t0, 2)
  report.update(memory_report(compiled, built.abstract, limit))
  progress(f"compiled in {report['compile_s']} s; compiling the init")
  # The init (random params, the optimizer's zero state) is a program of its own: its compile
  # and its memory (the state it makes + its temporaries) apart from the step's.
  t0 = time.perf_counter()
  init = built.init_fn.lower().compile()
  report['init_compile_s'] = round(time.perf_counter() - t0, 2)
  report['init_memory_bytes'] = plan_bytes(init.memory_analysis())
  if 'device_bytes_limit' in report and report['init_memory_bytes'] is not None:
    report['init_fits'] = report['init_memory_bytes'] <= report['device_bytes_limit']
  progress(f"init compiled in {report['init_compile_s']} s")
  if not allocate:
    return built.model_cfg, counted, None, report
  t0 = time.perf_counter()
  state = [jax.block_until_ready(built.init_fn(init))]
  report['init_s'] = round(time.perf_counter() - t0, 2)
  progress(f"state initialised in {report['init_s']} s; timing steps")

  def step():
    state[0], metrics = compiled(state[0], batch)
    return float(metrics['loss'])  # Blocks until the step has run.

  return built.model_cfg, counted, step, report


def plan_bytes(mem):
  """A compiled program's device bytes from XLA's memory analysis (None where there is none):
  arguments + temporaries + outputs, the donated (aliased) arguments counted once."""
  return mem and (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)


def memory_report(compiled, abstract_state, limit=None):
  """What the compiled step holds per device, from XLA's buffer assignment (the plan a run
  allocates, on any backend), and the state's own bytes in total (params, optimizer state),
  set against `limit` (default: what the backend lets this process allocate, GPU/TPU only)."""
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  out = {'state_bytes': {k: nbytes(abstract_state[k]) for k in ('params', 'opt_state')}}
  mem = compiled and compiled.memory_analysis()
  if mem is None:
    return {**out, 'step_memory_bytes': None}
  fields = ('argument', 'output', 'alias', 'temp', 'generated_code', 'host_argument',
            'host_output', 'host_temp')
  out['memory_analysis'] = {f: getattr(mem, f'{f}_size_in_bytes', None) for f in fields}
  out['step_memory_bytes'] = plan_bytes(mem)
  limit = limit or (jax.devices()[0].memory_stats() or {}).get('bytes_limit')
  if limit:
    out['device_bytes_limit'] = limit
    out['fits'] = out['step_memory_bytes'] <= limit
  return out


def host_cpu():
  """The CPU's model name and its widest vector ISA (the matmul peak, and which library reaches
  it, depend on them)."""
  info = epath.Path('/proc/cpuinfo')
  text = info.read_text() if info.exists() else ''
  model = next((l.split(':', 1)[1].strip() for l in text.splitlines()
                if l.startswith('model name')), platform.processor() or platform.machine())
  flags = set(next((l.split(':', 1)[1].split() for l in text.splitlines()
                    if l.startswith('flags')), []))
  isa = next((f for f in ('avx512f', 'avx2', 'avx', 'sse4_2') if f in flags), 'unknown')
  return {'model': model, 'isa': isa, 'cores': os.cpu_count()}


def torch_trainer(cfg, model_cfg, has_head):
  """step() running one blocking train step of transformers' GPT-2 of the same shape with torch
  AdamW (same hyperparameters, clipping, dtype, batch of random tokens and micro-batches)."""
  import torch
  import transformers
  hf_cfg = transformers.GPT2Config(
      vocab_size=model_cfg.vocab_size, n_positions=model_cfg.max_len, n_embd=model_cfg.embed_dim,
      n_layer=model_cfg.num_layers, n_head=model_cfg.num_heads, n_inner=model_cfg.mlp_dim,
      activation_function='gelu_new', layer_norm_epsilon=model_cfg.ln_eps,
      resid_pdrop=model_cfg.dropout, embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout,
      num_labels=max(model_cfg.num_labels, 1), pad_token_id=0, bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  cls = (transformers.GPT2ForSequenceClassification if has_head else
         transformers.GPT2LMHeadModel)
  model = cls(hf_cfg).train()
  o = cfg.optim
  # Weight decay for the same params as jaxft's (optim.no_decay on HF's names: 'ln_1', 'bias',
  # 'wte', 'wpe' are in both); torch's own default would decay them all.
  decayed = optim.decays(o)
  groups = {True: [], False: []}
  for name, p in model.named_parameters():
    groups[decayed(name)].append(p)
  opt = torch.optim.AdamW(
      [{'params': groups[True]}, {'params': groups[False], 'weight_decay': 0.0}],
      lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  tokens = torch.randint(1, model_cfg.tokenizer_vocab or model_cfg.vocab_size, (B, T))
  labels = torch.zeros(B, dtype=torch.long) if has_head else tokens
  half = {'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(model_cfg.dtype)

  k = cfg.train.grad_accum  # Strided micro-batches of B/k rows, as jaxft's step takes them.

  def step():
    total = 0.0
    for i in range(k):
      with torch.autocast('cpu', dtype=half or torch.bfloat16, enabled=half is not None):
        loss = model(input_ids=tokens[i::k], labels=labels[i::k]).loss / k
      loss.backward()
      total += float(loss.detach())
    if o.clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total

  return step, {'torch': torch.__version__, 'transformers': transformers.__version__,
                'torch_no_decay_params': sum(p.numel() for p in groups[False]),
                'torch_threads': torch.get_num_threads(),
                'torch_matmul_peak_flops': round(torch_matmul_probe(half or torch.float32))}


def torch_matmul_probe(dtype, n=2048):
  """matmul_probe's figure for torch on the CPU: its own BLAS may reach another peak than XLA's."""
  import torch
  a = torch.randn(n, n, dtype=dtype)
  return 2 * n ** 3 / best_seconds(lambda: a @ a)


def step_stats(times, tokens_per_step):
  t = np.asarray(times)
  return {'step_s_median': round(float(np.median(t)), 4),
          'step_s_p10': round(float(np.percentile(t, 10)), 4),
          'step_s_p90': round(float(np.percentile(t, 90)), 4),
          'step_s_min': round(float(t.min()), 4), 'step_s_max': round(float(t.max()), 4),
          'tokens_per_s': round(tokens_per_step / float(np.median(t)), 1)}


def bench(cfg, steps, warmup=2, compare_hf=False, rounds=3, compile_only=False, target=None):
  """Train-step figures for `cfg` (and transformers + torch on the same shapes). compile_only:
  the compile time and memory plan alone, nothing allocated (configs too big for this machine),
  for this machine's devices or a `target`'s."""
  compile_only = compile_only or bool(target)  # A target's step can only be planned.
  if compare_hf and jax.default_backend() != 'cpu':
    # torch_trainer runs torch on the CPU: against jaxft on a GPU that is no comparison.
    raise config_lib.ConfigError(
        f'--compare-hf runs transformers + torch on the CPU; jaxft runs on '
        f'{jax.default_backend()} here: compare on a CPU (JAX_PLATFORMS=cpu)')
  if compare_hf and cfg.train.trainable != 'all':
    # torch's step would train every param and run the whole backward: another workload.
    raise config_lib.ConfigError(
        f'--compare-hf trains all of the HF model; train.trainable={cfg.train.trainable!r} '
        f'freezes params whose gradients jaxft then skips: compare with train.trainable=all')
  objective = objectives.get(cfg.objective)
  model_cfg, (flops, formula), jax_step, report = jax_trainer(cfg, not compile_only, target)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  result = {
      **({'host_cpu': host_cpu()} if report['platform'] == 'cpu' else {}),
      'model': model_cfg.__dict__, 'objective': cfg.objective, 'batch_size': B, 'seq_len': T,
      'grad_accum': cfg.train.grad_accum, 'moments_dtype': cfg.optim.moments_dtype,
      'offload': cfg.optim.offload, **report}
  if compile_only:
    return result
  peak, peak_source = device_peak(model_cfg.dtype, report['devices'])
  steppers = {'jaxft': jax_step}
  if compare_hf:
    steppers['hf_torch'], result['hf_versions'] = torch_trainer(cfg, model_cfg,
                                                                objective.has_head)
  times = {name: [] for name in steppers}
  faults = {name: [] for name in steppers}  # Host page faults: fresh memory touched per step.
  last_loss = {}
  for name, step in steppers.items():
    for _ in range(warmup):
      last_loss[name] = step()
  # Alternating rounds: slow phases of a shared machine hit both trainers alike.
  per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
  for n in per_round:
    for name, step in steppers.items():
      for _ in range(n):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        last_loss[name] = step()
        times[name].append(time.perf_counter() - t0)
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  # The median too: now and then the kernel takes back a process's idle pages, and the next
  # step faults them all in again.
  stats = {name: {**step_stats(t, B * T),
                  'host_page_faults_per_step': round(float(np.mean(faults[name]))),
                  'host_page_faults_median': round(float(np.median(faults[name])))}
           for name, t in times.items()}
  mem = jax.devices()[0].memory_stats() or {}
  result.update({
      'steps': steps, 'warmup': warmup, **stats['jaxft'], 'flops_per_token': flops,
      'mfu_formula': formula, 'peak_flops': round(peak), 'peak_source': peak_source,
      'model_tflops_per_s': round(stats['jaxft']['tokens_per_s'] * flops / 1e12, 4),
      'mfu': round(stats['jaxft']['tokens_per_s'] * flops / peak, 4),
      'peak_device_bytes': mem.get('peak_bytes_in_use'),
      'peak_host_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'reuse_host_memory': cfg.reuse_host_memory, 'final_loss': last_loss['jaxft'],
  })
  if compare_hf:
    hf = stats['hf_torch']
    # Both over the probe of the jaxft device (one yardstick), and torch's also over the peak
    # its own BLAS reaches: on a CPU where that is lower, the ratio says so.
    torch_peak = result['hf_versions']['torch_matmul_peak_flops']
    result['hf_torch'] = {**hf, 'mfu': round(hf['tokens_per_s'] * flops / peak, 4),
                          'mfu_of_own_peak': round(hf['tokens_per_s'] * flops / torch_peak, 4)}
    result['jaxft_vs_hf'] = round(stats['jaxft']['tokens_per_s'] / hf['tokens_per_s'], 3)
  return result


def size(n):
  return f'{n / 2 ** 30:.2f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def describe(r):
  """The human-readable summary of a bench result."""
  m = r['model']
  lines = [
      f"{r['platform']} ({r['device_kind']}) x{r['devices']}, mesh {r['mesh']}; "
      f"{r['objective']}: L={m['num_layers']} H={m['num_heads']} D={m['embed_dim']} "
      f"V={m['vocab_size']} {m['dtype']}, batch {r['batch_size']} x seq {r['seq_len']}"
      + (f"; host {r['host_cpu']['model']} ({r['host_cpu']['isa']}, {r['host_cpu']['cores']} "
         f"cores)" if 'host_cpu' in r else ''),
      f"state: params {size(r['state_bytes']['params'])}, optimizer "
      f"({r['moments_dtype']} moments{', offloaded' if r['offload'] else ''}) "
      f"{size(r['state_bytes']['opt_state'])} in all"
      + (f"; compile {r['compile_s']} s" if 'compile_s' in r else '')
      + (f"; compiled for target {r['target']}" if r['target'] else '')]
  if 'compile_error' in r:
    lines.append(f"does NOT fit in the device's {size(r['device_bytes_limit'])}: "
                 f"{r['compile_error']}")
  if r['step_memory_bytes'] is not None:
    a = r['memory_analysis']
    lines.append(
        f"step memory per device {size(r['step_memory_bytes'])} (XLA's plan: arguments "
        f"{size(a['argument'])} + temporaries {size(a['temp'])} + outputs {size(a['output'])} "
        f"- donated {size(a['alias'])})"
        + (f"; host {size(a['host_argument'] + a['host_temp'])}" if a['host_argument'] else '')
        + (f"; {'fits' if r['fits'] else 'does NOT fit'} in the device's "
           f"{size(r['device_bytes_limit'])}" if 'fits' in r else ''))
  if r.get('init_memory_bytes') is not None:
    lines.append(f"init: compile {r['init_compile_s']} s, memory per device "
                 f"{size(r['init_memory_bytes'])}"
                 + (f"; {'fits' if r['init_fits'] else 'does NOT fit'}" if 'init_fits' in r
                    else ''))
  if 'steps' not in r:  # compile_only
    return '\n'.join(lines)
  lines += [
      f"peak host RSS {r['peak_host_rss_mb']} MB; reuse_host_memory {r['reuse_host_memory']}",
      f"MFU formula: {r['mfu_formula']}; peak {r['peak_flops'] / 1e12:.3f} TFLOP/s from "
      f"{r['peak_source']}"]
  rows = [('jaxft', r)] + ([('hf+torch', r['hf_torch'])] if 'hf_torch' in r else [])
  for name, s in rows:
    lines.append(f"{name:9s} {s['tokens_per_s']:>10,.1f} tokens/s  step {s['step_s_median']:.4f} s "
                 f"median (p10 {s['step_s_p10']:.4f}, p90 {s['step_s_p90']:.4f}, "
                 f"{r['steps']} steps)  MFU {s['mfu']:.1%}  "
                 f"{s['host_page_faults_per_step']:,} page faults/step")
  if 'hf_torch' in r and (r['moments_dtype'] != 'float32' or r['offload']):
    lines.append(f"note: hf+torch keeps float32 AdamW moments on the device, jaxft "
                 f"{r['moments_dtype']} ones{', offloaded' if r['offload'] else ''}")
  if 'jaxft_vs_hf' in r:
    lines.append(f"jaxft / hf+torch tokens/s: {r['jaxft_vs_hf']:.3f}x; torch's own matmul peak "
                 f"{r['hf_versions']['torch_matmul_peak_flops'] / 1e12:.3f} TFLOP/s, of which "
                 f"it reaches {r['hf_torch']['mfu_of_own_peak']:.1%}")
  return '\n'.join(lines)


def bench_input(cfg, batches=200):
  """The trainer's input path on the config's own data: records read (or generated) and checked
  (once per run), then the TrainStream's batches, tokenized and packed as they are drawn."""
  tok = tokenizer_lib.build(cfg.tokenizer)
  objective = objectives.get(cfg.objective)
  t0 = time.perf_counter()
  records = objective.check(data.load_splits(cfg.data)['train'], cfg.data)
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
  if prompt_len < 1 or new < 1 or batch < 1 or prompt_len + new > model_cfg.max_len:
    raise config_lib.ConfigError(
        f'--decode needs --batch, --prompt-len and --new >= 1 and --prompt-len + --new <= the '
        f"model's {model_cfg.max_len} positions; got {batch}, {prompt_len}, {new}")
  with sharding.activate(mesh):
    model = model_lib.GPT(model_cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  prompts = np.random.default_rng(0).integers(0, 256, (batch, prompt_len)).astype(np.int32)
  lengths = np.full((batch,), prompt_len, np.int32)
  never = -1  # No EOS: every run decodes exactly `new` tokens.
  cached = generate.make_generate(graphdef, never, new)
  buf = np.concatenate([prompts, np.zeros((batch, new), np.int32)], 1)
  full = jax.jit(lambda p, t, n: evaluate.greedy(nnx.merge(graphdef, p), t, n, new))
  keys = jax.random.split(jax.random.key(0), batch)
  (c_first, c_s), (f_first, f_s) = timed(cached, params, prompts, lengths, keys), \
      timed(full, params, buf, lengths)
  return {'platform': jax.devices()[0].platform, 'model': model_cfg.__dict__, 'batch': batch,
          'prompt_len': prompt_len, 'new_tokens': new,
          'kv_cache': {'compile_s': round(c_first - c_s, 2), 's': round(c_s, 3),
                       'tokens_per_s': round(batch * new / c_s, 1)},
          'full_forward': {'compile_s': round(f_first - f_s, 2), 's': round(f_s, 3),
                           'tokens_per_s': round(batch * new / f_s, 1)}}


def main(argv):
  opts = {'steps': 20, 'warmup': 2, 'batch': 1, 'prompt-len': 64, 'new': 64, 'json': '',
          'target': ''}
  flags = {'decode': False, 'compare-hf': False, 'no-input': False, 'compile-only': False}
  rest, given = [], set()
  for a in config_lib.equals_form(argv):
    name, _, value = a[2:].partition('=')
    if a[2:] in flags:
      flags[a[2:]] = True
    elif name in opts and name in ('json', 'target'):
      opts[name] = value
    elif name in opts:
      given.add(name)
      if not value.isdigit():
        raise config_lib.ConfigError(f'--{name}: expected a whole number, got {value!r}')
      opts[name] = int(value)
    else:
      rest.append(a)
  if opts['steps'] < 1:
    raise config_lib.ConfigError('--steps: at least 1 step is timed')
  decode_only = sorted(given & {'batch', 'prompt-len', 'new'})
  if decode_only and not flags['decode']:
    # A train-step run would ignore them: --batch=8 is not the batch it times.
    raise config_lib.ConfigError(
        f"{', '.join('--' + n for n in decode_only)}: --decode's; the train step's batch is "
        f"--config.train.batch_size")
  if flags['compare-hf'] and (flags['compile-only'] or opts['target'] or flags['decode']):
    # Each of those times no train step: the comparison would be dropped without a word.
    raise config_lib.ConfigError('--compare-hf times train steps; --compile-only, --target and '
                                 '--decode run none')
  cfg, _ = config_lib.parse_args(rest, usage=__doc__.split('\n\n')[1].strip())
  # (~: no shell expands it after '='; gs:// stays as it is.)
  out = epath.Path(os.path.expanduser(opts['json'])) if opts['json'] else None
  if out:  # Before the run, not after minutes of it: a missing folder is made, a bad path named.
    if out.is_dir():
      raise IsADirectoryError(f'--json={out} is a directory; give a file name')
    out.parent.mkdir(parents=True, exist_ok=True)
  if opts['target']:
    # This process compiles for the target and runs nothing: its own backend stays the CPU,
    # which also keeps the plugins that the target needs from looking for their devices here.
    jax.config.update('jax_platforms', 'cpu')
    # A compile-only client cannot load a cached executable back: no persistent cache entries.
    jax.config.update('jax_enable_compilation_cache', False)
  train.configure_process(cfg)
  if flags['decode']:
    if opts['target']:
      raise config_lib.ConfigError('--target plans the train step; --decode runs here')
    result = bench_decode(cfg, opts['batch'], opts['prompt-len'], opts['new'])
    print(f"decode: batch {result['batch']}, {result['prompt_len']}-token prompts, "
          f"{result['new_tokens']} new tokens each ({result['platform']})")
    for way in ('kv_cache', 'full_forward'):
      r = result[way]
      print(f"  {way:12s} {r['tokens_per_s']:>12,.1f} tokens/s  {r['s']} s a call  "
            f"compile {r['compile_s']} s", flush=True)
  else:
    result = bench(cfg, opts['steps'], opts['warmup'], flags['compare-hf'],
                   compile_only=flags['compile-only'], target=opts['target'] or None)
    print(describe(result), flush=True)
    if not (flags['no-input'] or flags['compile-only'] or opts['target']):
      result['input'] = bench_input(cfg)
      # How many times faster than training consumes them the input path delivers batches
      # (records tokenized and packed on the fly, as in training).
      result['input_vs_train'] = round(result['input']['batches_per_s'] * result['step_s_median'],
                                       1)
      i = result['input']
      print(f"input: {i['records']:,} train records read and checked in {i['read_s']} s; "
            f"{i['batches_per_s']:,} batches/s ({i['batch_tokens_per_s']:,.0f} tokens/s), "
            f"{result['input_vs_train']}x what training consumes", flush=True)
  print(json.dumps(result), flush=True)  # First: a file that cannot be written loses nothing.
  if out:
    out.write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  from jaxft import cli
  cli.run(main)
