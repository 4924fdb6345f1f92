import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_config
from jaxft import optim
from jaxft.config import ConfigError
from test_sharding import run_steps


def test_grad_accumulation_equals_big_batch():
  """4 micro-batches of 4 give the update of one batch of 16 (same examples), on 8 devices."""
  one = run_steps(small_config(train__grad_accum=1), jax.devices(), num_steps=3)
  four = run_steps(small_config(train__grad_accum=4), jax.devices(), num_steps=3)
  np.testing.assert_allclose(one[0], four[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(one[1]['params'])),
                  jax.tree.leaves(jax.device_get(four[1]['params']))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compute_tracks_fp32():
  """bf16 compute keeps fp32 params and gives nearly the same losses."""
  fp32 = run_steps(small_config(), jax.devices(), num_steps=3)
  bf16 = run_steps(small_config(model__dtype='bfloat16'), jax.devices(), num_steps=3)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16[1]['params']))
  np.testing.assert_allclose(bf16[0], fp32[0], rtol=2e-2)
  assert bf16[0] != fp32[0]  # bf16 really was used.


def test_schedule_warmup_then_cosine_or_constant():
  cfg = small_config(optim__lr=1.0, optim__warmup_steps=10, optim__min_lr_ratio=0.1)
  lr = optim.schedule(cfg.optim, 110)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(60)) == pytest.approx(0.55)
  assert float(lr(110)) == pytest.approx(0.1)
  cfg.optim.schedule = 'constant'
  lr = optim.schedule(cfg.optim, 110)
  assert float(lr(5)) == pytest.approx(0.5) and float(lr(100)) == pytest.approx(1.0)


def test_weight_decay_mask_excludes_bias_layernorm_embeddings():
  """With zero gradients only weight decay moves params: exactly the matrices decay."""
  cfg = small_config(optim__lr=0.1, optim__warmup_steps=0, optim__weight_decay=0.5,
                     optim__schedule='constant', optim__clip_norm=0.0)
  from jaxft import model as model_lib, sharding, train
  mesh = sharding.make_mesh(cfg.mesh)
  tx, _ = optim.build(cfg.optim, 10)
  _, _, _, init_fn = train.build_state(cfg, model_lib.config_from(cfg.model, 258), tx, mesh)
  params = init_fn()['params']
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = model_lib.map_with_path(lambda path, u: bool(np.any(np.asarray(u) != 0)), updates)
  flat = {path: m for path, m in jax.tree_util.tree_leaves_with_path(moved)}
  decayed = sorted(model_lib.path_str(p) for p, m in flat.items() if m)
  assert decayed == sorted(f'h/{i}/{n}' for i in range(2) for n in (
      'attn/c_attn_kernel', 'attn/c_proj_kernel', 'mlp/c_fc_kernel', 'mlp/c_proj_kernel'))


def moments(opt_state):
  """AdamW's first and second moments in the optimizer state."""
  return {k: optax.tree.get(opt_state, k) for k in ('mu', 'nu')}


def test_bad_no_decay_regex_is_named():
  """A no_decay that is not a regex is a config error naming the key (it was a re.error
  traceback)."""
  with pytest.raises(ConfigError, match=r"optim\.no_decay='\(bias' is not a regex: missing \)"):
    optim.build(small_config(optim__no_decay='(bias').optim, 10)


def test_bf16_moments_halve_optimizer_memory_and_track_fp32():
  """optim.moments_dtype='bfloat16' stores mu and nu in bf16 (still so after updates), in half the
  bytes, with fp32 params, and 5 steps give the fp32 run's losses to 0.1%."""
  fp32 = run_steps(small_config(), jax.devices(), num_steps=5)
  bf16 = run_steps(small_config(optim__moments_dtype='bfloat16'), jax.devices(), num_steps=5)
  for (_, state, _), dtype in ((fp32, np.float32), (bf16, jnp.bfloat16)):
    for name, tree in moments(state['opt_state']).items():
      assert {x.dtype for x in jax.tree.leaves(tree)} == {np.dtype(dtype)}, name
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16[1]['params']))
  nbytes = lambda run: sum(x.nbytes for x in jax.tree.leaves(moments(run[1]['opt_state'])))
  assert nbytes(bf16) * 2 == nbytes(fp32), (nbytes(bf16), nbytes(fp32))
  np.testing.assert_allclose(bf16[0], fp32[0], rtol=1e-3)  # Measured on CPU: 3e-5.


def test_unknown_moments_dtype_is_named():
  cfg = small_config(optim__moments_dtype='float16')
  with pytest.raises(ConfigError, match=r"optim.moments_dtype 'float16'.*'float32', 'bfloat16'"):
    optim.build(cfg.optim, 10)


def test_int8_codes_round_trip_and_stochastic_rounding_is_unbiased():
  """optim.quantize / dequantize: nearest rounding (mu) is within half a level of every value;
  stochastic rounding (nu) lands on one of the two levels around the value, is unbiased over
  draws, keeps exact zeros and never turns a nonzero value (down to 1e-12 of its row's largest)
  into code 0."""
  rng = np.random.default_rng(0)
  # Rows spanning 12 orders of magnitude, a row of zeros, one 1-D param (one scale).
  nu = jnp.asarray(10.0 ** rng.uniform(-12, 0, (3, 64)) * rng.uniform(0.5, 2, (3, 1)),
                   jnp.float32).at[1].set(0.0).at[0, :5].set(0.0)
  mu = jnp.asarray(rng.normal(size=(4, 64)) * 10.0 ** rng.uniform(-3, 0, (4, 64)), jnp.float32)

  row_max = lambda x: jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = row_max(mu)
  codes = optim.quantize(mu, scale, optim.MU_CODE)
  assert codes.dtype == jnp.int8
  back = optim.dequantize(codes, scale, optim.MU_CODE)
  c = 127 * np.sqrt(np.abs(mu) / scale)  # The value's position in levels.
  half_level = scale * ((c + 0.5) ** 2 - c ** 2) / 127 ** 2  # p=2: levels widen with |x|.
  assert np.all(np.abs(back - mu) <= half_level * (1 + 1e-5))
  assert np.all(np.sign(back) == np.sign(np.round(c) * np.sign(mu)))

  s = row_max(nu)
  codes = np.stack([optim.quantize(nu, s, optim.NU_CODE, jnp.uint32(i)) for i in range(400)])
  assert codes.dtype == np.uint8
  backs = np.stack([optim.dequantize(q, s, optim.NU_CODE) for q in codes])
  assert np.all(codes[:, nu == 0] == 0) and np.all(backs[:, nu == 0] == 0)
  assert np.all(codes[:, nu > 0] >= 1)
  s = np.asarray(s)
  pos = 255 * (np.asarray(nu) / np.where(s > 0, s, 1)) ** 0.25
  assert np.all((codes == np.floor(pos)) | (codes == np.floor(pos) + 1) | (codes == 1))
  # Unbiased: the mean of 400 draws is within 4 standard errors of the value, the standard error
  # of a draw between the two levels around it being (above - below) * sqrt(p (1 - p)).
  inside = (pos >= 1) & (nu > 0)  # (Below the first level the floor at code 1 rounds up.)
  below, above = (s * (np.floor(pos) / 255) ** 4, s * ((np.floor(pos) + 1) / 255) ** 4)
  p = np.clip((nu - below) / (above - below), 0, 1)
  se = (above - below) * np.sqrt(p * (1 - p) / len(codes))
  err = (np.abs(backs.mean(0) - nu) - 1e-5 * nu)[inside] / se[inside]
  assert err.max() < 4, err.max()  # Measured: 3.0.


def test_int8_moments_quarter_optimizer_memory_and_track_fp32():
  """optim.moments_dtype='int8': mu as int8 and nu as uint8 codes (still so after updates) with
  one float32 scale per row, 3.4x fewer optimizer bytes here (rows of 8 and 32), fp32 params,
  and 5 steps give the fp32 run's losses to 1e-5."""
  fp32 = run_steps(small_config(), jax.devices(), num_steps=5)
  int8 = run_steps(small_config(optim__moments_dtype='int8'), jax.devices(), num_steps=5)
  for name, dtype in (('mu', np.int8), ('nu', np.uint8), ('mu_scale', np.float32)):
    assert {x.dtype for x in jax.tree.leaves(optax.tree.get(int8[1]['opt_state'], name))} == {
        np.dtype(dtype)}, name
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(int8[1]['params']))
  nbytes = lambda run: sum(x.nbytes for x in jax.tree.leaves(run[1]['opt_state']))
  assert 3.3 < nbytes(fp32) / nbytes(int8) < 4, (nbytes(fp32), nbytes(int8))
  np.testing.assert_allclose(int8[0], fp32[0], rtol=1e-5)  # Measured on CPU: 2.4e-6.
  assert int8[0] != fp32[0]  # The moments really were rounded.


def test_hash_uniform_is_uniform_uncorrelated_and_the_same_on_any_sharding():
  """optim.hash_uniform, the stochastic rounding's draws: uniform on [0, 1) (Kolmogorov-Smirnov
  distance of 2^20 draws), neighbours along either axis and the same element under consecutive
  seeds uncorrelated, and each element's value the same whether the array is computed whole or
  split over 8 devices (a resume onto another mesh draws the same bits)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  shape = (1024, 1024)
  u = np.asarray(optim.hash_uniform(shape, jnp.uint32(7)), np.float64)
  assert u.min() >= 0 and u.max() < 1
  sorted_u = np.sort(u.ravel())
  ks = np.max(np.abs(sorted_u - np.arange(1, u.size + 1) / u.size))
  assert ks < 1.63 / np.sqrt(u.size), ks  # The 1% critical value.
  corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]
  later = np.asarray(optim.hash_uniform(shape, jnp.uint32(8)), np.float64)
  for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u, later)):
    assert abs(corr(a, b)) < 4 / np.sqrt(a.size), corr(a, b)  # 4 standard errors.
  assert np.mean(u == later) < 1e-4
  mesh = jax.make_mesh((4, 2), ('a', 'b'))
  split = jax.jit(optim.hash_uniform, static_argnums=0,
                  out_shardings=NamedSharding(mesh, P('a', 'b')))(shape, jnp.uint32(7))
  assert len(split.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(split), u.astype(np.float32))


def test_int8_second_moment_decays_like_fp32_at_b2_0999():
  """A row's nu entries that stop getting gradient while its largest keeps it must decay by b2 a
  step relative to that largest: at b2 = 0.999 that is 0.1%, less than a level, so nearest
  rounding keeps them where they are forever; stochastic rounding lets them decay. 1000 steps:
  the int8 Adam's nu ends where the fp32 one does (0.999^1000 = 0.37 of the start) on average."""
  from flax import nnx
  shape = (4, 256)
  first = np.random.default_rng(0).uniform(0.3, 0.7, shape)
  first[:, 0] = 1.0
  later = np.zeros(shape)
  later[:, 0] = 1.0  # Column 0 keeps its gradient: each row's largest nu stays put.
  wrap = lambda g: {'w': nnx.Param(jnp.asarray(g, jnp.float32))}
  grads = [wrap(first)] + [wrap(later)] * 1000
  nus = {}
  for name in ('float32', 'int8'):
    tx = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    tx = optim.int8_moments(tx, 0.9, 0.999) if name == 'int8' else tx
    state, step = tx.init(wrap(np.ones(shape))), jax.jit(tx.update)
    for g in grads:
      _, state = step(g, state)
    nus[name] = (optim.dequantize(state.nu['w'][...], state.nu_scale['w'][...], optim.NU_CODE)
                 if name == 'int8' else state.nu['w'][...])
  ratio = (np.asarray(nus['int8']) / np.asarray(nus['float32']))[:, 1:]
  print('int8 / fp32 nu after 1000 steps: mean', ratio.mean(), 'median', np.median(ratio))
  # Unbiased, not exact: each entry's rounding noise adds up over nu's ~1/(1 - b2) steps of
  # memory, more so at these entries' low codes (1e-4 of the row's largest). Measured: mean
  # 1.002, median 0.85 (with jax.random's uniforms before optim.hash_uniform: 1.017, 0.88).
  assert abs(ratio.mean() - 1) < 0.05 and 0.7 < np.median(ratio) < 1.3

  # The same decay under nearest rounding (optim.quantize without a seed) goes nowhere.
  x = jnp.asarray(first * 1e-3, jnp.float32)  # (1 - b2) g^2
  scale = jnp.max(x, axis=-1, keepdims=True)  # Stays put: the largest keeps its gradient.
  q = optim.quantize(x, scale, optim.NU_CODE)
  for _ in range(1000):
    v = 0.999 * optim.dequantize(q, scale, optim.NU_CODE) + 1e-3 * jnp.asarray(later ** 2)
    q = optim.quantize(v, scale, optim.NU_CODE)
  stuck = np.asarray(optim.dequantize(q, scale, optim.NU_CODE) / x)[:, 1:]
  assert stuck.min() > 0.95  # Measured: no decay at all (fp32: 0.37).


def test_int8_moments_resume_onto_another_mesh(tmp_path, capsys):
  """A run with int8 moments checkpointed on data=8 and resumed on fsdp=4 x tensor=2 ends where
  the uninterrupted run ends: codes and scales restore onto the new shardings, and the
  stochastic rounding draws the same bits (they depend on the step count only, not the mesh)."""
  import os
  import shutil
  from conftest import small_argv
  from experiments.kill_resume import read_params
  from jaxft import train
  opts = dict(optim__moments_dtype='int8', train__steps=6, checkpoint__every=3,
              checkpoint__keep=5, checkpoint__keep_best=False)
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  train.main(small_argv(whole, **opts))
  shutil.copytree(whole, resumed)  # As if the run had stopped after step 3's checkpoint.
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  os.remove(os.path.join(resumed, 'summary.json'))
  capsys.readouterr()
  train.main(small_argv(resumed, mesh__data=1, mesh__fsdp=4, mesh__tensor=2, **opts))
  assert 'checkpoints/3' in capsys.readouterr().out
  a, b = read_params(whole), read_params(resumed)
  assert a.keys() == b.keys()
  # The meshes sum gradients in other orders, so now and then a moment rounds to the next code
  # (on one AVX2 CPU: 1 of wte's 12,288 params, by 6e-6); elsewhere the two runs agree to float
  # rounding, and a flip moves a param by far less than a step (lr 2e-3).
  for k in a:
    off = ~np.isclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert off.mean() <= 1e-3 and np.max(np.abs(a[k] - b[k])) < 5e-5, (k, off.sum())


def test_apply_if_finite_by_select_matches_optax_cond():
  """jaxft's apply_if_finite (a select per array) takes optax.apply_if_finite's decisions with
  its state layout: NaN / inf gradients are dropped (zero update, Adam state kept) up to
  max_consecutive_errors in a row, then let through; the counters agree at every step."""
  inner = optax.adam(0.1)
  ours, theirs = optim.apply_if_finite(inner, 2), optax.apply_if_finite(inner, 2)
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
  bad = lambda v: {'w': jnp.full((2, 3), v), 'b': jnp.ones(3)}
  grads = [bad(0.5), bad(jnp.nan), bad(jnp.inf), bad(0.25), bad(jnp.nan), bad(jnp.nan),
           bad(jnp.nan), bad(1.0)]
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  applied = []
  for g in grads:
    u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params)
    u_theirs, s_theirs = jax.jit(theirs.update)(g, s_theirs, params)
    np.testing.assert_array_equal(u_ours['b'], u_theirs['b'])
    np.testing.assert_array_equal(u_ours['w'], u_theirs['w'])  # NaN where both let NaN through.
    for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_theirs)):
      np.testing.assert_array_equal(a, b)
    applied.append(bool(jnp.any(u_ours['b'] != 0)))
  # Finite, dropped twice, finite, dropped twice, the third NaN in a row let through, finite.
  assert applied == [True, False, False, True, False, False, True, True]
  assert int(s_ours.total_notfinite) == 5
