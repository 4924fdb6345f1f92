"""The speed and memory switches (configs/common.py) leave the math unchanged.

Each switch trains the small model 5 steps on the same batches from the same init and must give
the baseline's losses and final params: to float rounding in float32, to a stated looser
tolerance in bfloat16. Each switch also visibly changes the traced train step (so those
comparisons cannot pass vacuously), bad values are named, and jaxft.bench's figures add up.
"""
import collections
import json
import os
import platform
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from conftest import DEFAULT_CODEGEN, ROOT, SMALL, small_config, xla_flags
from jaxft import bench, config as config_lib, data, model as model_lib, objectives, sharding, \
    tokenizer, train
from jaxft.config import ConfigError

STEPS = 5
ONE = dict(mesh__data=1, mesh__fsdp=1, mesh__tensor=1)
MESH_222 = dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
BLOCKS = dict(model__attention='causal_blocks', model__attention_block=8)  # seq 32 = 4 blocks.

# Largest differences from the baseline measured on CPU (jax 0.10.2, XLA's default codegen) are
# in the comments; the tolerances are a few times those. FP32 covers float rounding only (the
# switches that change no arithmetic, remat and scan_layers, measured exactly 0 there; under the
# tests' unoptimized codegen, conftest.py, their programs round differently: params up to 7e-7).
FP32 = dict(loss=1e-5, params=2e-6)  # Measured: loss 1.4e-6 (loss_chunk), params 4.7e-7.

# Evidence that a switch changed the traced train step, from `trace_counts` (primitive names, plus
# 'dtype:<dtype>' per value produced and 'jit:<name>' per inner jit call), vs the baseline's.
# jax.checkpoint's primitive (name varies). The baseline has one per layer (model._bias_gelu's),
# 2 in all; the counts below are measured.
remat = lambda c: c['remat2'] + c['checkpoint']

CASES = [  # (id, overrides, tolerances, evidence(switch counts, baseline counts))
    # 4 query blocks: one (smaller) scores and values matmul pair per block.
    ('causal_blocks', BLOCKS, FP32,  # Measured: loss 0, params 3.5e-7.
     lambda c, b: c['dot_general'] > b['dot_general'] and c['concatenate'] > b['concatenate']),
    # Blocks of 10 over seq 32: 10 + 10 + 10 + 2 (it was one block, i.e. einsum, unless c | L).
    ('causal_blocks_ragged', dict(BLOCKS, model__attention_block=10), FP32,
     lambda c, b: c['dot_general'] > b['dot_general'] and c['concatenate'] > b['concatenate']),
    # jax.nn.dot_product_attention builds its own causal mask (a tril per layer).
    ('dot_product', dict(model__attention='dot_product'), FP32,  # Measured: 0, 3.4e-7.
     lambda c, b: c['jit:tril'] > b['jit:tril']),
    ('remat_nothing', dict(model__remat='nothing_saveable'), FP32,  # Measured: 0, 0.
     lambda c, b: remat(c) == 6 and remat(b) == 2),
    ('remat_dots', dict(model__remat='dots_with_no_batch_dims_saveable'), FP32,  # 0, 0.
     lambda c, b: remat(c) == 6 and remat(b) == 2),
    # One traced block: half the matmuls in the program, and scans over the layers.
    ('scan_layers', dict(model__scan_layers=True), FP32,  # Measured: 0, 0.
     lambda c, b: c['scan'] > b['scan'] and c['dot_general'] < b['dot_general']),
    ('scan_layers+remat', dict(model__scan_layers=True, model__remat='nothing_saveable'), FP32,
     # The one traced block's (scan_layers alone: 1, its GELU's), and the block's own.
     lambda c, b: c['scan'] > b['scan'] and remat(c) == 3 and remat(b) == 2),  # Measured: 0, 0.
    # One variadic reduce (running max and sum) in place of logsumexp's max and sum passes.
    ('one_pass_logsumexp', dict(model__logsumexp='one_pass'), FP32,  # Measured: 4.8e-7, 5.7e-7.
     lambda c, b: c['reduce'] == b['reduce'] + 1 and c['reduce_max'] < b['reduce_max']),
    # 512 tokens in chunks of 100: the last chunk is padded (88 dummy tokens).
    ('loss_chunk', dict(model__loss_chunk=100), FP32,  # Measured: 1.4e-6, 1.9e-7.
     lambda c, b: c['scan'] > b['scan'] and remat(c) == 3 and remat(b) == 2),
    # bf16 activations move the losses by ~1e-4 but single params by up to 3.6e-3, half of all
    # that 5 AdamW steps at lr <= 2e-3 move them: the key bias's gradient is rounding noise (keys
    # shifted alike leave the softmax unchanged) that Adam scales to full steps. So the params
    # are compared by their update as a whole. Measured: loss 1.6e-4, update 1.5e-2.
    ('dtype_bf16', dict(model__dtype='bfloat16'), dict(loss=5e-4, update=5e-2),
     lambda c, b: c['dtype:bfloat16'] > 0 and b['dtype:bfloat16'] == 0),
    # AdamW's moments stored in bf16 (the update still computed in fp32).
    ('moments_bf16', dict(optim__moments_dtype='bfloat16'), dict(loss=5e-4, params=2e-4),
     lambda c, b: c['dtype:bfloat16'] > 0 and b['dtype:bfloat16'] == 0),  # 1.75e-4, 4.3e-5.
    # ... or as 8-bit codes with a scale per row (dequantized for the update, which is fp32).
    # Measured: loss 1.1e-5, params 3.1e-4 (the rounding of small moments moves single params).
    ('moments_int8', dict(optim__moments_dtype='int8'), dict(loss=1e-4, params=1e-3),
     lambda c, b: c['dtype:int8'] > 0 and c['dtype:uint8'] > 0 and b['dtype:int8'] == 0),
    # On by default, so the case turns it off: the residual-stream gradient no longer written
    # once per block (the in-place rewrite of position 0 below is gone).
    # Measured: 0, 2.8e-7 under the tests' codegen (conftest.py); bit for bit under XLA's default
    # one (test_grad_barrier_changes_no_arithmetic_under_xlas_default_codegen).
    ('grad_barrier_off', dict(model__grad_barrier=False), FP32,
     lambda c, b: c['dynamic_update_slice'] < b['dynamic_update_slice']),
    # LayerNorm's backward from the saved row mean and 1/std (their optimization barrier shows).
    ('layernorm_vjp', dict(model__layernorm_vjp=True), FP32,
     lambda c, b: c['optimization_barrier'] == b['optimization_barrier'] + 5),
    # The optimizer state kept in host memory: moved to the device and back every step.
    ('offload', dict(optim__offload=True), dict(loss=0, params=0),
     lambda c, b: c['device_put'] >= 2 + b['device_put']),
]
IDS = [case[0] for case in CASES]


def parts(cfg, devices):
  """(mesh, objective, train.setup's model, optimizer, state and train step) for `cfg`."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  objective = objectives.get(cfg.objective)
  return mesh, objective, train.setup(cfg, tokenizer.build(cfg.tokenizer), objective, mesh)


@pytest.fixture(scope='module')
def batches():
  """The first STEPS batches of the small config's demo stream (packed rows, segment ids)."""
  cfg = small_config()
  tok, objective = tokenizer.build(cfg.tokenizer), objectives.get(cfg.objective)
  records = objective.check(data.load_splits(cfg.data)['train'], cfg.data)
  stream = objective.stream(records, tok, cfg.data, cfg.train.batch_size, cfg.seed)
  out = [next(stream) for _ in range(STEPS)]
  for batch in out:
    del batch['record_ids']
  return out


@pytest.fixture(scope='module')
def init():
  """The baseline's initial state on the host: every run starts from exactly this (it is also
  what each switched config's own init would give: no switch changes the params)."""
  _, _, built = parts(small_config(**ONE), jax.devices()[:1])
  return jax.device_get(built.init_fn())


def run(cfg, init, batches, devices=None, compiler_options=None):
  """STEPS train steps of `cfg` from `init` on the fixed batches: (losses, final params); the
  step compiled with `compiler_options` (XLA flags) where given."""
  devices = jax.devices()[:1] if devices is None else devices
  mesh, _, built = parts(cfg, devices)
  if cfg.optim.moments_dtype == 'int8':  # Codes and scales: the one optimizer state of its own.
    assert jax.tree.structure(built.abstract['params']) == jax.tree.structure(init['params'])
    state = {**built.init_fn(), 'params': jax.device_put(init['params'], built.shardings['params'])}
  else:
    leaves, treedef = jax.tree.flatten(built.abstract)
    assert treedef == jax.tree.structure(init)  # The switches leave the state's layout alone.
    # Cast to the state's dtypes (bf16 moments start as zeros either way).
    start = jax.tree.unflatten(treedef, [np.asarray(x).astype(a.dtype)
                                         for x, a in zip(jax.tree.leaves(init), leaves)])
    state = jax.device_put(start, built.shardings)
  step = built.train_step
  if compiler_options:
    step = step.lower(state, sharding.shard_batch(batches[0], mesh)).compile(
        compiler_options=compiler_options)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state['params'])


def differences(a, b, init=None):
  """Largest loss and param differences of two runs; with `init` also how far apart their
  updates are relative to the update, over all params: |(a - init) - (b - init)| / |b - init|."""
  pa, pb = jax.tree.leaves(a[1]), jax.tree.leaves(b[1])
  out = {'loss': float(np.max(np.abs(a[0] - b[0]))),
         'params': max(float(np.max(np.abs(x - y))) for x, y in zip(pa, pb))}
  if init is not None:
    norm = lambda trees: np.sqrt(sum(np.sum(np.square(x - y)) for x, y in zip(*trees)))
    out['update'] = float(norm((pa, pb)) / norm((pb, jax.tree.leaves(init['params']))))
  return out


def assert_within(diff, tolerance, what):
  for k, tol in tolerance.items():
    assert diff[k] <= tol, f'{what}: {k} differs by {diff[k]:.3g} > {tol:g} ({diff})'


@pytest.fixture(scope='module')
def baseline(init, batches):
  """The defaults (switches off but model.grad_barrier), one device."""
  return run(small_config(**ONE), init, batches)


@pytest.mark.parametrize('name, overrides, tolerance, evidence', CASES, ids=IDS)
def test_switch_trains_like_baseline(name, overrides, tolerance, evidence, init, batches,
                                     baseline):
  """Every step's loss and the final params match the run with all switches off."""
  got = run(small_config(**ONE, **overrides), init, batches)
  diff = differences(got, baseline, init)
  print(name, diff)
  assert_within(diff, tolerance, name)
  assert got[0][-1] < got[0][0]  # It trains.


def test_grad_barrier_changes_no_arithmetic_under_xlas_default_codegen(init, batches):
  """Compiled as a user's run is, the barrier on and off give the same losses and params bit
  for bit: it only moves a fusion boundary."""
  on, off = (run(small_config(**ONE, model__grad_barrier=b), init, batches,
                 compiler_options=DEFAULT_CODEGEN) for b in (True, False))
  assert_within(differences(off, on), dict(loss=0, params=0), 'grad_barrier_off')


def test_switches_on_8_devices_match_one(init, batches, baseline):
  """scan_layers + causal_blocks + loss_chunk + the one-pass logsumexp (a reduction over the
  vocab, which tensor splits) on a data=2 x fsdp=2 x tensor=2 mesh of 8 devices trains like the
  same switches on one device (and like the baseline)."""
  switches = dict(model__scan_layers=True, model__loss_chunk=100, model__logsumexp='one_pass',
                  **BLOCKS)
  one = run(small_config(**ONE, **switches), init, batches)
  eight = run(small_config(**MESH_222, **switches), init, batches, jax.devices())
  print('8 devices vs 1:', differences(eight, one), '1 vs baseline:', differences(one, baseline))
  assert_within(differences(eight, one), FP32, '8 devices vs 1')  # Measured: 4.8e-6, 5.2e-7.
  assert_within(differences(one, baseline), FP32, 'switches vs baseline')


def test_compute_dtype_logits_train_like_float32_ones_under_bf16(init, batches):
  """model.logits_dtype='compute' under bf16 compute: the loss reads bfloat16 [tokens, vocab]
  logits, widened to float32 in its reductions (float32 from the matmul in the default), and
  trains like the float32 logits of the same bf16 run, within bf16 rounding of the logits. (Under
  float32 compute the switch changes nothing.)"""
  bf16 = dict(**ONE, model__dtype='bfloat16')
  widened = []
  for dtype in ('float32', 'compute'):
    cfg = small_config(**bf16, model__logits_dtype=dtype)
    _, objective, built = parts(cfg, jax.devices()[:1])
    batch = bench.synthetic_batch(objective, tokenizer.build(cfg.tokenizer), cfg.data,
                                  cfg.train.batch_size)
    jaxpr = jax.make_jaxpr(built.train_step)(built.abstract, batch).jaxpr
    vocab = built.model_cfg.vocab_size
    widened.append(sum(e.primitive.name == 'convert_element_type' and
                      e.invars[0].aval.dtype == 'bfloat16' and e.outvars[0].aval.dtype == 'float32'
                      and e.outvars[0].aval.shape[-1:] == (vocab,) for e in iter_eqns(jaxpr)))
  assert widened[0] == 0 and widened[1] > 0, widened  # bf16 logits widened for the loss.
  f32, compute = (run(small_config(**bf16, model__logits_dtype=d), init, batches)
                  for d in ('float32', 'compute'))
  diff = differences(compute, f32, init)
  print('logits_dtype=compute vs float32 (bf16 compute):', diff)
  assert_within(diff, dict(loss=2e-4, update=5e-2), 'logits_dtype')  # Measured: 1.9e-5, 1.6e-2.
  assert diff['loss'] > 0  # The logits really were rounded.


@pytest.fixture(scope='module')
def dropout_loop(init, batches):
  return run(small_config(**ONE, model__dropout=0.1), init, batches)


@pytest.mark.parametrize('overrides', [
    dict(model__scan_layers=True), dict(model__remat='nothing_saveable'),
    dict(model__scan_layers=True, model__remat='dots_with_no_batch_dims_saveable')],
    ids=['scan_layers', 'remat', 'scan_layers+remat'])
def test_dropout_keys_survive_scan_and_remat(overrides, init, batches, baseline, dropout_loop):
  """With dropout, scan_layers and remat draw the same masks as the plain layer loop: losses
  bit for bit (and dropout really is on: the losses are not the dropout-free ones)."""
  got = run(small_config(**ONE, model__dropout=0.1, **overrides), init, batches)
  np.testing.assert_array_equal(got[0], dropout_loop[0])
  assert_within(differences(got, dropout_loop), FP32, 'dropout')  # Measured: params identical.
  assert np.min(np.abs(dropout_loop[0] - baseline[0])) > 1e-4  # Measured: 9.7e-4 and up.


def iter_eqns(jaxpr):
  """Every equation of a jaxpr, those of the jaxprs nested in it (jit, scan, remat...) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          yield from iter_eqns(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          yield from iter_eqns(sub)


def trace_counts(cfg):
  """Counts of what the train step's jaxpr does (traced on abstract values, nothing compiled):
  primitive names, 'dtype:<dtype>' per value produced, 'jit:<name>' per inner jit call."""
  _, objective, built = parts(cfg, jax.devices()[:1])
  batch = bench.synthetic_batch(objective, tokenizer.build(cfg.tokenizer), cfg.data,
                                cfg.train.batch_size)
  counts = collections.Counter()
  for eqn in iter_eqns(jax.make_jaxpr(built.train_step)(built.abstract, batch).jaxpr):
    counts[eqn.primitive.name] += 1
    counts.update(f'dtype:{v.aval.dtype}' for v in eqn.outvars if hasattr(v.aval, 'dtype'))
    if 'name' in eqn.params and eqn.primitive.name in ('jit', 'pjit'):
      counts[f'jit:{eqn.params["name"]}'] += 1
  return counts


@pytest.mark.parametrize('name, overrides, tolerance, evidence', CASES, ids=IDS)
def test_switch_changes_the_computation(name, overrides, tolerance, evidence):
  """Each switch shows in the traced train step: the equivalence above is not one program run
  twice."""
  base, switched = trace_counts(small_config(**ONE)), trace_counts(small_config(**ONE, **overrides))
  assert switched != base
  assert evidence(switched, base), f'{name}: {dict(switched - base)} / {dict(base - switched)}'


def compiled_text(cfg, devices):
  """The optimized HLO of the train step for `cfg` on `devices`."""
  mesh, objective, built = parts(cfg, devices)
  batch = bench.synthetic_batch(objective, tokenizer.build(cfg.tokenizer), cfg.data,
                                cfg.train.batch_size)
  return built.train_step.lower(
      built.abstract, sharding.shard_batch(batch, mesh)).compile().as_text()


def largest_fusion(cfg):
  """Instructions in the largest fusion of the compiled train step (CPU) that outputs an array:
  scalar ones (the global gradient norm, the finiteness check) grow with the parameter count."""
  hlo = compiled_text(cfg, jax.devices()[:1])
  sizes = [c.count('\n') for c in re.split(r'\n(?=%|ENTRY)', hlo) if c.startswith('%fused')
           and not re.search(r'ROOT \S+ = \w+\[\] ', c)]
  return max(sizes)


def test_grad_barrier_keeps_backward_fusions_flat_in_depth():
  """model.grad_barrier (on by default): without it XLA fuses the residual-stream gradient's whole
  chain from the top layer down into each transposed copy made for a weight gradient, so the
  largest fusion grows with depth (measured: 236 instructions at 3 layers, 428 at 6, 620 at 9);
  with it the largest is the same at 3, 6 and 9 layers (measured 78). Under the tests' codegen
  (conftest.py): 74 at 3 and 6 layers with it, 424 at 6 without."""
  with_3, with_6 = (largest_fusion(small_config(**ONE, model__num_layers=n)) for n in (3, 6))
  without_6 = largest_fusion(small_config(**ONE, model__num_layers=6, model__grad_barrier=False))
  print('largest fusion with the barrier, 3 and 6 layers:', with_3, with_6, 'without, 6:', without_6)
  assert with_6 == with_3
  assert without_6 > 3 * with_6


def test_grad_barrier_adds_no_communication():
  """On a data=2 x fsdp=2 x tensor=2 mesh the barrier's in-place rewrite of position 0 stays on
  each shard (the length axis is never split): the step has the same collectives without it."""
  def collectives(**overrides):  # (op, result shapes) of every collective, in program order.
    hlo = compiled_text(small_config(**MESH_222, **overrides), jax.devices())
    ops = r'all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all'
    return re.findall(rf'= (.*?) ({ops})(?:-start)?\(', hlo)
  with_barrier, without = collectives(), collectives(model__grad_barrier=False)
  print('collectives with / without the barrier:', len(with_barrier), len(without))
  assert without and with_barrier == without


@pytest.mark.parametrize('overrides, message, known', [
    (dict(model__attention='flash'), r"unknown model\.attention 'flash'; known: ",
     model_lib.ATTENTION),
    (dict(model__remat='bogus'), r"unknown model\.remat 'bogus'; known: none, ",
     ('nothing_saveable', 'dots_with_no_batch_dims_saveable')),
    (dict(model__attention='dot_product', model__dropout=0.1),
     r"model\.attention='dot_product' has no dropout.*model\.dropout=0", ()),
    (dict(model__logsumexp='online'), r"unknown model\.logsumexp 'online'; known: ",
     model_lib.LOGSUMEXP),
    (dict(model__dtype='fp16'), r"unknown model\.dtype 'fp16'; known: ", model_lib.DTYPES),
    (dict(model__logits_dtype='bf16'), r"unknown model\.logits_dtype 'bf16'; known: ",
     model_lib.LOGITS_DTYPES),
    (dict(model__dropout=1.0), r'model\.dropout=1\.0 must be in \[0, 1\)', ()),
    # A policy factory, not a policy: it used to fail inside the traced step ("got an
    # unexpected keyword argument 'axes'").
    (dict(model__remat='save_only_these_names'),
     r"unknown model\.remat 'save_only_these_names'; known: none, ", ('nothing_saveable',)),
], ids=['attention', 'remat', 'dot_product+dropout', 'logsumexp', 'dtype', 'logits_dtype',
        'dropout', 'remat_factory'])
def test_bad_switch_values_are_named(overrides, message, known):
  """A bad switch value fails when the model config is built, naming the key and the choices."""
  with pytest.raises(ConfigError, match=message) as error:
    model_lib.config_from(small_config(**overrides).model, 258)
  for value in known:
    assert value in str(error.value)


def test_remat_takes_every_policy_of_jax_checkpoint_policies():
  """model.remat accepts each policy (and checkpoint_dots, dots_saveable's alias) by name."""
  for policy in ('nothing_saveable', 'everything_saveable', 'dots_saveable', 'checkpoint_dots',
                 'dots_with_no_batch_dims_saveable', 'checkpoint_dots_with_no_batch_dims'):
    assert model_lib.config_from(small_config(model__remat=policy).model, 258).remat == policy


def test_flops_per_token_gpt2_124m():
  """GPT-2 124M at T=1024: 6N + 12LHQT with N = all params but wpe, worked out by hand."""
  cfg = small_config(model__size='gpt2', model__vocab_size=50257)
  for k in ('num_layers', 'num_heads', 'embed_dim', 'max_len'):
    cfg.model[k] = None
  gpt2 = model_lib.config_from(cfg.model, 50257)
  n = 124_439_808 - 1024 * 768  # HF's count, minus the wpe lookup table.
  flops, formula = bench.flops_per_token(gpt2, n, 1024)
  assert flops == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024 == 855_166_464
  assert formula.startswith('6N + 12LHQT = 6*123,653,376 + 12*12*12*64*1024 = 855.2 MFLOP')


def test_flops_per_token_counts_what_a_frozen_backbone_computes():
  """With train.trainable freezing params, MFU's FLOPs are what the step computes: forward for
  every matmul, weight gradients for trained params only, input gradients (and the attention
  core's backward) only above the lowest trained param. Everything trained: 6N + 12LHQT."""
  cfg = small_config(objective='classification')
  mesh, objective, built = parts(cfg, jax.devices()[:1])
  sizes, m = built.param_sizes, built.model_cfg
  L, H, Q, T = m.num_layers, m.num_heads, m.head_dim, 32
  n = sum(v for k, v in sizes.items() if k not in ('wte', 'wpe'))  # Classification: no LM head.
  count = lambda trainable, spec: bench.frozen_flops_per_token(m, sizes, trainable, True, T, spec)

  flops, formula = count(train.trainable_fn(small_config(objective='classification',
                                                         train__trainable='head'), objective),
                         'head')
  assert flops == 2 * n + 2 * sizes['score'] + 4 * L * H * Q * T  # Forward only, but the head.
  assert formula.startswith("2N + 2N_trained + 2N_backward + (4L + 8L_backward)HQT "
                            "(train.trainable='head'")
  assert f'= 2*{n:,} + 2*{sizes["score"]:,} + 2*0 + (4*2 + 8*0)*4*8*32 = ' in formula

  layer1 = sum(v for k, v in sizes.items() if k.startswith('h/1/'))
  ln_1 = sizes['h/1/ln_1/scale'] + sizes['h/1/ln_1/bias']
  above = layer1 - ln_1 + sizes['ln_f/scale'] + sizes['ln_f/bias'] + sizes['score']
  assert count(lambda p: p.startswith('h/1/'), 'h/1/')[0] == (
      2 * n + 2 * layer1 + 2 * above + (4 * L + 8 * 1) * H * Q * T)
  assert count(lambda p: True, '.')[0] == bench.flops_per_token(m, n, T)[0] == (
      6 * n + 12 * L * H * Q * T)


@pytest.mark.parametrize('spec', ['all', 'head', 'h/1/|score', 'h/0/mlp'])
def test_frozen_flops_per_token_matches_xlas_count_of_the_step(spec):
  """The FLOPs counted per token are those of the compiled step by XLA's own cost analysis
  (plus its elementwise work and AdamW's: 1.2-3.1% more at the demo's classification
  config), whatever train.trainable freezes; 6N + 12LHQT was 3x a head-only step's."""
  cfg = config_lib.load_file(os.path.join(ROOT, 'configs', 'demo.py') + ':classification')
  for k, v in {'train.trainable': spec, 'model.attention': 'einsum',
               'reuse_host_memory': 'False'}.items():
    config_lib.override(cfg, k, v)
  mesh, objective, built = parts(cfg, jax.devices()[:1])
  tok = tokenizer.build(cfg.tokenizer)
  B, T = cfg.train.batch_size, cfg.data.seq_len  # 32 x 16: AdamW's per-step work is ~1% of it.
  batch = sharding.shard_batch(bench.synthetic_batch(objective, tok, cfg.data, B), mesh)
  xla = built.train_step.lower(built.abstract, batch).compile().cost_analysis()['flops']
  if built.trainable is None:
    n = sum(v for k, v in built.param_sizes.items() if k not in ('wte', 'wpe'))
    ours = bench.flops_per_token(built.model_cfg, n, T)[0]
  else:
    ours = bench.frozen_flops_per_token(built.model_cfg, built.param_sizes, built.trainable, True,
                                        T, spec)[0]
  print(f'{spec}: XLA {xla / (B * T):,.0f} FLOPs per token, counted {ours:,}')
  assert 1.0 <= xla / (B * T) / ours <= 1.05


def test_bench_frozen_backbone_mfu_and_compare_hf(tmp_path, capsys, root, monkeypatch):
  """jaxft.bench with a frozen backbone reports the frozen count (the 6N one put a CPU's MFU of
  a head-only step above 100%); --compare-hf refuses it, since torch would train everything,
  and refuses a jaxft on another backend than torch's CPU."""
  argv = [f'--config={os.path.join(root, "configs", "demo.py")}:classification'] + \
      [f'--config.{k}={v}' for k, v in SMALL.items()] + ['--config.train.trainable=head']
  with pytest.raises(ConfigError, match=r"--compare-hf trains all of the HF model; "
                     r"train.trainable='head' freezes params"):
    bench.bench(small_config(objective='classification', train__trainable='head'), 1,
                compare_hf=True)
  with monkeypatch.context() as m:  # torch runs on the CPU: jaxft on a GPU is refused too.
    m.setattr(jax, 'default_backend', lambda: 'gpu')
    with pytest.raises(ConfigError, match=r'--compare-hf runs transformers \+ torch on the CPU; '
                       r'jaxft runs on gpu here'):
      bench.bench(small_config(), 1, compare_hf=True)
  out = tmp_path / 'frozen.json'
  bench.main(argv + ['--steps=1', '--warmup=0', '--no-input', f'--json={out}'])
  r = json.loads(out.read_text())
  cfg = small_config(objective='classification', train__trainable='head')
  _, objective, built = parts(cfg, jax.devices())
  expected = bench.frozen_flops_per_token(built.model_cfg, built.param_sizes, built.trainable,
                                          True, 32, 'head')
  assert (r['flops_per_token'], r['mfu_formula']) == expected
  n = sum(v for k, v in built.param_sizes.items() if k not in ('wte', 'wpe'))
  assert r['flops_per_token'] == 2 * n + 2 * built.param_sizes['score'] + 4 * 2 * 4 * 8 * 32
  assert r['mfu'] == pytest.approx(r['tokens_per_s'] * r['flops_per_token'] / r['peak_flops'],
                                   abs=6e-5)
  assert f"MFU formula: {r['mfu_formula']}" in capsys.readouterr().out


def test_compare_hf_torch_step_takes_the_same_micro_batches(monkeypatch):
  """--compare-hf with train.grad_accum=k: torch's step runs k micro-batches of B/k rows before
  one AdamW update, as jaxft's does, for the loss of the whole batch."""
  import transformers
  seen = []
  forward = transformers.GPT2LMHeadModel.forward

  def counting(self, input_ids=None, **kwargs):
    seen.append(input_ids.shape)
    return forward(self, input_ids=input_ids, **kwargs)
  monkeypatch.setattr(transformers.GPT2LMHeadModel, 'forward', counting)
  losses = {}
  for k in (1, 4):
    cfg = small_config(train__grad_accum=k)
    model_cfg = objectives.model_config(cfg, tokenizer.build(cfg.tokenizer))
    step, _ = bench.torch_trainer(cfg, model_cfg, False)
    seen.clear()
    losses[k] = step()
    assert seen == [(16 // k, 32)] * k
  assert losses[4] == pytest.approx(losses[1], rel=1e-5)


def test_mfu_peak_is_the_whole_meshs(monkeypatch):
  """tokens/s counts every device's tokens, so MFU's peak is the datasheet's per chip times the
  mesh's chips (8 H100s: 8 x 989 TFLOP/s, it was one chip's); a CPU's probe already covers the
  cores its devices share."""
  chip = lambda platform, kind: type('Device', (), {'platform': platform, 'device_kind': kind})()
  monkeypatch.setattr(jax, 'devices', lambda: [chip('gpu', 'NVIDIA H100 80GB HBM3')])
  assert bench.device_peak('bfloat16', 8) == (8 * 989e12, 'datasheet (NVIDIA H100 80GB HBM3, '
                                              'bfloat16) x 8')
  assert bench.device_peak('float32', 1) == (989e12 / 2, 'datasheet (NVIDIA H100 80GB HBM3, '
                                             'float32)')
  assert bench.device_peak('float16', 1)[0] == 989e12  # Tensor cores: fp16 at bf16's rate.
  monkeypatch.setattr(bench, 'matmul_probe', lambda dtype: 1e11)
  monkeypatch.setattr(jax, 'devices', lambda: [chip('cpu', 'cpu')])
  assert bench.device_peak('float32', 8) == (1e11, 'matmul probe (cpu, float32, 2048^3)')
  monkeypatch.setattr(jax, 'devices', lambda: [chip('gpu', 'NVIDIA B200')])  # Not in the table.
  assert bench.device_peak('bfloat16', 2)[0] == 2e11


@pytest.mark.parametrize('objective', ['next_token', 'labeled_pair', 'classification'])
def test_bench_batch_rows_are_full_for_each_objective(objective):
  """bench's batch is full rows for every objective, also where the text field is the prompt
  field (the demo's classification reads 'prompt': its rows were half padding)."""
  cfg = config_lib.load_file(os.path.join(ROOT, 'configs', 'demo.py') + f':{objective}')
  b = bench.synthetic_batch(objectives.get(objective), tokenizer.build(cfg.tokenizer), cfg.data,
                            cfg.train.batch_size)
  assert b['segment_ids'].shape == (cfg.train.batch_size, cfg.data.seq_len)
  assert (b['segment_ids'] > 0).all()
  if objective == 'labeled_pair':  # The completion, half of each row, carries the loss.
    assert abs(b['loss_mask'].sum(1) - cfg.data.seq_len / 2).max() <= 2


def test_bench_main_compare_hf(tmp_path, capsys, root):
  """jaxft.bench with --compare-hf on CPU: the JSON figures are consistent with each other and
  with the model, and the summary prints the MFU formula and the jaxft / HF ratio."""
  out = tmp_path / 'bench.json'
  bench.main([f'--config={os.path.join(root, "configs", "demo.py")}'] +
             [f'--config.{k}={v}' for k, v in SMALL.items()] +
             ['--steps=3', '--warmup=1', '--compare-hf', '--no-input', f'--json={out}'])
  captured = capsys.readouterr()
  printed = captured.out
  r = json.loads(out.read_text())
  # Each stage is reported on stderr as it is reached (a run killed at a time limit shows how
  # far it got), with the times the JSON holds.
  assert (f"bench: compiled in {r['compile_s']} s; compiling the init\n"
          f"bench: init compiled in {r['init_compile_s']} s\n"
          f"bench: state initialised in {r['init_s']} s; timing steps\n") in captured.err

  cfg = small_config()
  model_cfg = objectives.model_config(cfg, tokenizer.build(cfg.tokenizer))
  with sharding.activate(sharding.make_mesh(cfg.mesh)):
    params = nnx.state(nnx.eval_shape(lambda: model_lib.GPT(model_cfg, nnx.Rngs(0))), nnx.Param)
  n = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
          if model_lib.path_str(p) != 'wpe')
  L, H, Q, T, B = 2, 4, 32 // 4, 32, 16
  assert (model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim) == (L, H, Q)
  assert (r['batch_size'], r['seq_len'], r['steps'], r['warmup']) == (B, T, 3, 1)
  assert r['flops_per_token'] == 6 * n + 12 * L * H * Q * T
  # torch's AdamW leaves out of weight decay what jaxft's does (optim.no_decay): the same count.
  exempt = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
               if re.search(cfg.optim.no_decay, model_lib.path_str(p)))
  assert 0 < exempt < n and r['hf_versions']['torch_no_decay_params'] == exempt

  assert r['compile_s'] > 0
  assert r['step_s_min'] <= r['step_s_median'] <= r['step_s_max']
  # tokens_per_s comes from the unrounded median; step_s_median is rounded to 1e-4 s.
  med, tps = r['step_s_median'], r['tokens_per_s']
  assert B * T / (med + 5e-5) - 0.05 <= tps <= B * T / (med - 5e-5) + 0.05
  assert r['mfu'] == pytest.approx(tps * r['flops_per_token'] / r['peak_flops'], abs=6e-5)
  assert 'matmul probe' in r['peak_source']

  hf = r['hf_torch']
  assert hf['tokens_per_s'] > 0 and hf['step_s_min'] <= hf['step_s_median'] <= hf['step_s_max']
  ratio = tps / hf['tokens_per_s']
  assert r['jaxft_vs_hf'] == pytest.approx(ratio, rel=0.05 / tps + 0.05 / hf['tokens_per_s'],
                                           abs=5e-4)

  # torch's MFU also over the peak its own BLAS reaches (a probe in the same run).
  torch_peak = r['hf_versions']['torch_matmul_peak_flops']
  assert torch_peak > 0 and hf['mfu_of_own_peak'] == pytest.approx(
      hf['tokens_per_s'] * r['flops_per_token'] / torch_peak, abs=6e-5)
  assert r['host_cpu']['cores'] == os.cpu_count() and r['host_cpu']['isa'] != ''

  assert f'MFU formula: 6N + 12LHQT = 6*{n:,} + 12*{L}*{H}*{Q}*{T} = ' in printed
  assert f"jaxft / hf+torch tokens/s: {r['jaxft_vs_hf']:.3f}x" in printed


def test_bench_compile_only_plans_memory_without_allocating(tmp_path, capsys, root, monkeypatch):
  """--compile-only: XLA's memory plan for the step and the state's bytes (int8 moments: 2 codes
  + 2 row scales per param), with no step run and the state never initialised."""
  out = tmp_path / 'plan.json'
  setup = train.setup

  def no_init(*args):
    built = setup(*args)
    never = lambda compiled=None: pytest.fail('--compile-only initialised the state')
    never.lower, built.init_fn = built.init_fn.lower, never  # Planned, never run.
    return built
  monkeypatch.setattr(train, 'setup', no_init)
  bench.main([f'--config={os.path.join(root, "configs", "demo.py")}'] +
             [f'--config.{k}={v}' for k, v in SMALL.items()] +
             ['--config.optim.moments_dtype=int8', '--compile-only', f'--json={out}'])
  printed = capsys.readouterr().out
  r = json.loads(out.read_text())
  cfg = small_config(optim__moments_dtype='int8')
  mesh, objective, built = parts(cfg, jax.devices())
  shapes = [x.shape for x in jax.tree.leaves(built.abstract['params'])]
  n = sum(int(np.prod(s)) for s in shapes)
  rows = sum(int(np.prod(s[:-1])) for s in shapes)
  assert r['state_bytes']['params'] == 4 * n
  # Codes (1 byte each), the row scales (float32) of both moments, and the scalars (step
  # counts, the non-finite counters).
  scalars = sum(x.dtype.itemsize for x in jax.tree.leaves(built.abstract['opt_state'])
                if x.ndim == 0)
  assert r['state_bytes']['opt_state'] == 2 * n + 2 * 4 * rows + scalars
  a = r['memory_analysis']
  assert r['step_memory_bytes'] == a['argument'] + a['temp'] + a['output'] - a['alias'] > 0
  assert 'steps' not in r and 'tokens_per_s' not in r
  assert 'step memory per device' in printed and 'int8 moments' in printed
  assert 'fits' not in r and 'init_fits' not in r  # The CPU reports no device memory limit ...
  # The init, planned on its own: the state it makes, and its temporaries.
  assert r['init_compile_s'] > 0 and r['init_memory_bytes'] >= sum(r['state_bytes'].values())
  assert f"init: compile {r['init_compile_s']} s, memory per device" in printed

  # ... a GPU does: the plan is set against it.
  batch = bench.synthetic_batch(objective, tokenizer.build(cfg.tokenizer), cfg.data,
                                cfg.train.batch_size)
  compiled = built.train_step.lower(built.abstract, sharding.shard_batch(batch, mesh)).compile()
  for limit in (r['step_memory_bytes'], r['step_memory_bytes'] - 1):
    device = type('Device', (), {'memory_stats': lambda self, limit=limit: {'bytes_limit': limit}})
    monkeypatch.setattr(jax, 'devices', lambda: [device()])
    plan = bench.memory_report(compiled, built.abstract)
    assert plan['fits'] == (limit == r['step_memory_bytes'])
    assert plan['step_memory_bytes'] == r['step_memory_bytes']


def test_attention_auto_and_flash_follow_the_platform_the_model_runs_on():
  """'auto' is the platform's fastest exact attention, and cuDNN's flash kernel is used only on
  GPU in bf16: the platform is the mesh's (a compile-only target's), not this process's."""
  resolve = lambda platform, **o: model_lib.config_from(small_config(**o).model, 258,
                                                         platform=platform)
  picks = [(c.attention, c.flash) for c in (
      resolve('cpu'), resolve('gpu'), resolve('gpu', model__dtype='bfloat16'),
      resolve('gpu', model__dtype='bfloat16', model__dropout=0.1), resolve('tpu'),
      resolve('gpu', model__dtype='bfloat16', model__attention='einsum'))]
  assert picks == [('causal_blocks', False), ('einsum', False), ('dot_product', True),
                   ('einsum', False), ('einsum', False), ('einsum', False)]
  assert resolve(None).attention == 'causal_blocks'  # This process's backend: the CPU.
  assert [resolve(p).logsumexp for p in ('cpu', 'gpu', 'tpu')] == ['two_pass', 'one_pass',
                                                                    'two_pass']
  assert resolve('gpu', model__logsumexp='two_pass').logsumexp == 'two_pass'


def test_auto_attention_picks_cudnn_flash_only_for_head_dims_it_takes():
  """cuDNN's flash kernel takes head dims that are multiples of 8 up to 128 (256 on Hopper):
  'auto' on GPU in bf16 picks XLA's einsum for others (it picked cuDNN, whose NotImplementedError
  then came from inside the traced step), and an explicit 'dot_product' is refused, naming why."""
  resolve = lambda **o: model_lib.config_from(small_config(model__dtype='bfloat16', **o).model,
                                              258, platform='gpu')
  for embed, heads, pick in ((144, 4, 'einsum'), (1024, 4, 'einsum'), (1024, 8, 'dot_product'),
                             (120, 3, 'dot_product')):  # Head dims 36, 256, 128, 40.
    c = resolve(model__embed_dim=embed, model__num_heads=heads)
    assert (c.attention, c.flash) == (pick, pick == 'dot_product')
  assert resolve(model__attention='dot_product', model__embed_dim=1024, model__num_heads=4).flash
  with pytest.raises(ConfigError, match=r"model\.attention='dot_product' is cuDNN's flash "
                     r".*model\.embed_dim / model\.num_heads = 36: use model\.attention='einsum'"):
    resolve(model__attention='dot_product', model__embed_dim=144, model__num_heads=4)
  # On CPU, or in float32, dot_product is XLA's attention: any head dim.
  assert model_lib.config_from(small_config(model__attention='dot_product', model__embed_dim=144,
                                            model__num_heads=4).model, 258,
                               platform='gpu').flash is False


def test_bench_target_plans_the_step_for_chips_this_machine_lacks(tmp_path, capsys, root):
  """--target: the step compiled by XLA's own compiler for an H100 and for a TPU v5e slice
  (fsdp over its 4 chips) on this CPU-only machine, set against that chip's memory; a model
  too big for it does not fit (the TPU compiler refuses it outright)."""
  def plan(target, **overrides):
    out = tmp_path / f'{target}.json'
    bench.main([f'--config={os.path.join(root, "configs", "demo.py")}'] +
               [f'--config.{k}={v}' for k, v in {**SMALL, **overrides}.items()] +
               [f'--target={target}', f'--json={out}'])
    return json.loads(out.read_text()), capsys.readouterr().out

  r, printed = plan('h100', **{'model.dtype': 'bfloat16'})
  assert (r['platform'], r['device_kind'], r['devices']) == ('gpu', 'NVIDIA H100 80GB HBM3', 1)
  assert (r['model']['attention'], r['model']['flash']) == ('dot_product', True)  # cuDNN's.
  a = r['memory_analysis']
  assert r['step_memory_bytes'] == a['argument'] + a['temp'] + a['output'] - a['alias'] > 0
  assert r['device_bytes_limit'] == int(84_942_979_072 * 0.95) and r['fits']
  assert 'steps' not in r and 'compiled for target h100' in printed and 'fits in' in printed
  assert r['init_fits'] and r['init_memory_bytes'] >= sum(r['state_bytes'].values())

  # 8.6B params (an 8M-row vocab): 34 GB of fp32 params and 69 GB of moments.
  huge = {'model.vocab_size': str(2 ** 23), 'model.embed_dim': '1024'}
  r, printed = plan('h100', **huge)
  assert r['state_bytes']['params'] > 4 * 2 ** 23 * 1024
  assert r['step_memory_bytes'] > 3 * r['state_bytes']['params'] > r['device_bytes_limit']
  assert not r['fits'] and 'does NOT fit' in printed

  fsdp, wide = {'mesh.data': '1', 'mesh.fsdp': '4'}, {'model.embed_dim': '256'}
  r, _ = plan('v5e:2x2', **fsdp, **wide)
  assert (r['device_kind'], r['devices'], r['mesh']['fsdp']) == ('TPU v5 lite', 4, 4)
  assert r['model']['attention'] == 'einsum' and r['fits']
  assert r['device_bytes_limit'] == int(15.75 * 2 ** 30)
  replicated, _ = plan('v5e:2x2', **{'mesh.data': '4', 'mesh.fsdp': '1'}, **wide)
  assert replicated['memory_analysis']['argument'] >= sum(r['state_bytes'].values())
  # fsdp: each chip holds a quarter of the params and moments, padded to the TPU's tiles (the
  # head_dim of 64 to 128 lanes): measured 0.33 of the replicated arguments.
  assert r['memory_analysis']['argument'] < 0.4 * replicated['memory_analysis']['argument']
  r, printed = plan('v5e:2x2', **fsdp, **huge)
  assert not r['fits'] and r['step_memory_bytes'] is None
  assert 'RESOURCE_EXHAUSTED' in r['compile_error'] and 'does NOT fit' in printed

  with pytest.raises(ConfigError, match=r"unknown --target 'a100'; known: h100, h200, v5e"):
    plan('a100')
  with pytest.raises(ConfigError, match=r'optim\.offload with --target: .* no host memory'):
    plan('h100', **{'optim.offload': 'True'})


def test_threefry_gpu_kernel_draws_the_init_with_jaxs_cuda_kernel_in_the_h100_plan():
  """threefry_gpu_kernel: in XLA's H100 plan of the init every random draw is one call of JAX's
  CUDA threefry kernel instead of the cipher's rounds in XLA ops (a program a fraction of the
  size). The flag lowers GPU programs only: the state initialised on this CPU is the same to
  the bit. (That the
  kernel's bits are XLA's is JAX's to test; experiments/gpu_bench.sh compares the two on a GPU.)"""
  devices, _ = bench.target_devices('h100')
  kernel = 'custom_call_target="cu_threefry2x32'
  plans, states = {}, {}
  width = {'model__embed_dim': 48}  # (Not the init another test's bench planned for an H100.)
  for on in (False, True):
    cfg = small_config(threefry_gpu_kernel=on, **width)
    try:
      train.configure_process(cfg)
      plans[on] = parts(cfg, devices)[2].init_fn.lower().compile().as_text()
      states[on] = jax.device_get(parts(cfg, jax.devices()[:1])[2].init_fn())
    finally:
      jax.config.update('jax_threefry_gpu_kernel_lowering', False)
  random = lambda path: any(name in path for name in ('kernel', 'wte', 'wpe'))  # Not 0 or 1.
  draws = sum(map(random, parts(small_config(**width), jax.devices()[:1])[2].param_sizes))
  assert kernel not in plans[False] and plans[True].count(kernel) >= draws, draws
  print('plan characters with / without the kernel:', len(plans[True]), len(plans[False]))
  assert len(plans[True]) < 0.5 * len(plans[False])  # Measured: 0.39.
  jax.tree.map(np.testing.assert_array_equal, states[True], states[False])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc\'s')
def test_reuse_host_memory_stops_faulting_the_step_memory_in_afresh(tmp_path, root):
  """reuse_host_memory (glibc malloc keeps what it frees, train.reuse_host_memory): the same
  final loss, and the step's buffers are no longer mapped and faulted in anew on every step."""
  runs = {}
  for on in (True, False):  # In subprocesses: malloc is tuned once for a whole process.
    out = tmp_path / f'{on}.json'
    subprocess.run([sys.executable, '-m', 'jaxft.bench', '--config=configs/demo.py',
                    '--config.model.embed_dim=128', '--config.data.seq_len=256',
                    '--config.train.batch_size=16', f'--config.reuse_host_memory={on}',
                    '--steps=8', '--no-input', f'--json={out}'],
                   cwd=root, env={**os.environ, 'XLA_FLAGS': xla_flags(1)}, check=True,
                   capture_output=True)
    runs[on] = json.loads(out.read_text())
  on, off = runs[True], runs[False]
  assert on['final_loss'] == off['final_loss']  # Same init, batch and steps: to the bit.
  # Off, each step faults in (nearly) all of its ~216 MB of buffers: measured 98% of the pages.
  pages = off['step_memory_bytes'] / 4096
  assert off['host_page_faults_median'] > 0.5 * pages
  # On, they are reused: the median step faults in none (measured 0). Not the mean: this
  # sandbox's kernel now and then takes the idle pages back, and the next step faults them all
  # in again (seen in 1 or 2 steps of 12).
  assert on['host_page_faults_median'] < 0.1 * off['host_page_faults_median']


def test_offloaded_optimizer_state_stays_on_the_host_and_resumes(tmp_path, capsys):
  """optim.offload: between steps every optimizer array sits in pinned host memory (the params
  on the device); a run checkpointed and resumed with it ends where one without it ends."""
  import shutil
  from conftest import small_argv
  from experiments.kill_resume import read_params
  cfg = small_config(**ONE, optim__offload=True)
  mesh, objective, built = parts(cfg, jax.devices()[:1])
  state = built.init_fn()
  step_fn = built.train_step
  batch = bench.synthetic_batch(objective, tokenizer.build(cfg.tokenizer), cfg.data,
                                cfg.train.batch_size)
  state, _ = step_fn(state, sharding.shard_batch(batch, mesh))
  kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
  assert kinds(state['opt_state']) == {'pinned_host'}
  assert kinds(state['params']) == {jax.devices()[0].default_memory().kind}

  opts = dict(train__steps=6, checkpoint__every=3, checkpoint__keep=5, checkpoint__keep_best=False)
  plain, offloaded = str(tmp_path / 'plain'), str(tmp_path / 'offloaded')
  train.main(small_argv(plain, **opts))
  train.main(small_argv(offloaded, optim__offload=True, **opts))
  shutil.rmtree(os.path.join(offloaded, 'checkpoints', '6'))
  capsys.readouterr()
  train.main(small_argv(offloaded, optim__offload=True, **opts))  # Resumes from step 3.
  assert 'checkpoints/3' in capsys.readouterr().out
  a, b = read_params(plain), read_params(offloaded)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_bench_prints_its_decode_and_input_figures(capsys, root):
  """--decode printed only its JSON line, and the input path's figures were in the JSON alone:
  each has readable lines with the JSON's numbers."""
  argv = [f'--config={os.path.join(root, "configs", "demo.py")}'] + \
      [f'--config.{k}={v}' for k, v in SMALL.items()]
  bench.main(argv + ['--decode', '--batch=2', '--prompt-len=8', '--new=4'])
  lines = capsys.readouterr().out.splitlines()
  r = json.loads(lines[-1])
  assert lines[-4] == f"decode: batch 2, 8-token prompts, 4 new tokens each ({r['platform']})"
  for line, way in zip(lines[-3:-1], ('kv_cache', 'full_forward')):
    assert line.split()[:3] == [way, f"{r[way]['tokens_per_s']:,.1f}", 'tokens/s'], line
  bench.main(argv + ['--steps=1', '--warmup=0'])
  lines = capsys.readouterr().out.splitlines()
  r = json.loads(lines[-1])
  assert lines[-2] == (f"input: {r['input']['records']:,} train records read and checked in "
                       f"{r['input']['read_s']} s; {r['input']['batches_per_s']:,} batches/s "
                       f"({r['input']['batch_tokens_per_s']:,.0f} tokens/s), "
                       f"{r['input_vs_train']}x what training consumes")
