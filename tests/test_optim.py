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
