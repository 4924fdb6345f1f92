"""The same 5 steps on 1 device and on meshes of 8 fake devices: same losses, rules-table specs."""
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import small_config
from jaxft import data, model as model_lib, objectives, optim, sharding, tokenizer, train


def run_steps(cfg, devices, num_steps=5, trainable=None):
  """`num_steps` train steps of cfg's objective on `devices`: (losses, state, shardings)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  tok = tokenizer.build(cfg.tokenizer)
  objective = objectives.get(cfg.objective)
  records = objective.check(data.load_splits(cfg.data)['train'], cfg.data)
  num_labels = objectives.labels(cfg.data)[0] if objective.has_head else 0
  model_cfg = model_lib.config_from(cfg.model, tok.vocab_size, num_labels)
  tx, lr = optim.build(cfg.optim, cfg.train.steps, trainable)
  graphdef, abstract, shardings, init_fn = train.build_state(cfg, model_cfg, tx, mesh)
  state = init_fn()
  step_fn = train.make_train_step(graphdef, objective, tx, lr, cfg.train.grad_accum, trainable)
  it = objective.stream(records, tok, cfg.data, cfg.train.batch_size, cfg.seed)
  losses = []
  for _ in range(num_steps):
    batch = next(it)
    del batch['record_ids']
    state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  return losses, state, shardings


@pytest.fixture(scope='module')
def reference():
  cfg = small_config(mesh__data=1)
  losses, state, _ = run_steps(cfg, jax.devices()[:1])
  return losses, jax.device_get(state['params'])


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_mesh_matches_single_device(shape, reference):
  d, f, t = shape
  cfg = small_config(mesh__data=d, mesh__fsdp=f, mesh__tensor=t)
  losses, state, shardings = run_steps(cfg, jax.devices())
  ref_losses, ref_params = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert losses[-1] < losses[0]  # It trains, on every mesh.
  for a, b in zip(jax.tree.leaves(jax.device_get(state['params'])), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The state lives where the shardings (derived from the rules table) say.
  for arr, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert arr.sharding.is_equivalent_to(sh, arr.ndim)


def test_param_specs_follow_rules_table():
  """Each parameter's spec is its logical axes looked up in sharding.RULES, plus 'fsdp' (the FSDP
  rule) on one dimension where RULES leaves it unused, nothing else."""
  cfg = small_config(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg = model_lib.config_from(cfg.model, 258)
  tx, _ = optim.build(cfg.optim, 10)
  _, abstract, shardings, _ = train.build_state(cfg, model_cfg, tx, mesh)
  rules = dict(sharding.RULES)
  params = nnx.to_flat_state(abstract['params'])
  specs = dict(nnx.to_flat_state(shardings['params']))
  expected = {
      ('wte',): P('tensor', 'fsdp'),
      ('wpe',): P(None, 'fsdp'),
      ('h', 0, 'attn', 'c_attn_kernel'): P('fsdp', None, 'tensor', None),
      ('h', 0, 'attn', 'c_attn_bias'): P(None, 'tensor', 'fsdp'),  # [3, heads, kv]: kv is larger.
      ('h', 0, 'attn', 'c_proj_kernel'): P('tensor', None, 'fsdp'),
      ('h', 1, 'mlp', 'c_fc_kernel'): P('fsdp', 'tensor'),
      ('h', 1, 'mlp', 'c_fc_bias'): P(('tensor', 'fsdp')),
      ('h', 1, 'mlp', 'c_proj_kernel'): P('tensor', 'fsdp'),
      ('ln_f', 'scale'): P('fsdp'),
  }
  for path, want in expected.items():
    assert specs[path].get_value().spec == want, path
  for path, var in params:
    axes = var.get_metadata()['out_sharding']
    assert len(axes) == len(var.shape), path
    got = [sharding.mesh_axes(e) for e in specs[path].get_value().spec]
    table = [sharding.mesh_axes(rules[a] if a else None) for a in axes]
    if any('fsdp' in t for t in table):
      assert got == table, path
    else:  # The FSDP rule: 'fsdp' appended to one dimension (on this mesh one always divides).
      assert sum(g.count('fsdp') for g in got) == 1, path
      assert [g[:-1] if g[-1:] == ('fsdp',) else g for g in got] == table, path


def test_mesh_from_config_fills_minus_one():
  cfg = small_config(mesh__data=-1, mesh__fsdp=2, mesh__tensor=2)
  assert dict(sharding.make_mesh(cfg.mesh).shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  bad = small_config(mesh__data=3, mesh__fsdp=1, mesh__tensor=1)
  with pytest.raises(ValueError, match='needs 3 devices, have 8'):
    sharding.make_mesh(bad.mesh)
  bad = small_config(mesh__data=-1, mesh__fsdp=3, mesh__tensor=1)  # It said 'mesh [-1, 3, 1]'.
  with pytest.raises(ValueError, match=r'^8 devices do not divide by mesh\.fsdp=3 x '
                                       r'mesh\.tensor=1, so the -1 axis cannot take the rest$'):
    sharding.make_mesh(bad.mesh)


def test_indivisible_param_is_named():
  """4 heads cannot split 8 ways: the error names the parameter, and the config keys on both
  sides (the mesh axis and the model size behind the param's logical axis), before anything is
  allocated."""
  cfg = small_config(mesh__data=1, mesh__fsdp=1, mesh__tensor=8)
  mesh = sharding.make_mesh(cfg.mesh)
  tx, _ = optim.build(cfg.optim, 10)
  with pytest.raises(ValueError, match=re.escape(
      "['params']['h'][0]['attn']['c_attn_bias'].value has a dimension of 4 (its 'heads' axis: "
      "model.num_heads), not divisible over mesh.tensor=8 devices: change the mesh or the model "
      "size (17 more arrays alike)")):
    train.build_state(cfg, model_lib.config_from(cfg.model, 258), tx, mesh)
  cfg = small_config(mesh__data=1, mesh__fsdp=8, model__embed_dim=36)  # 36 = 4 heads x 9.
  with pytest.raises(ValueError, match=re.escape(
      "['params']['h'][0]['attn']['c_attn_kernel'].value has a dimension of 36 (its 'embed' "
      "axis: model.embed_dim), not divisible over mesh.fsdp=8 devices")):
    train.build_state(cfg, model_lib.config_from(cfg.model, 258), tx, sharding.make_mesh(cfg.mesh))


def device_bytes(tree, device):
  """Bytes of `tree`'s arrays held by `device` (its shards only)."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree)
             for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize('mlp_dim', [None, 36])
def test_fsdp_splits_params_and_optimizer_state_evenly(mlp_dim):
  """On a pure fsdp mesh each device holds ~1/8 of params + AdamW moments, biases included.

  The small model (embed 32) is the meaningful size: there the biases that RULES alone leaves
  replicated put device 0 at 1.08x total / 8. With mlp_dim 36 the MLP bias [36] divides over no
  mesh axis: it stays replicated (and works), which costs almost nothing.
  """
  cfg = small_config(mesh__data=1, mesh__fsdp=8, mesh__tensor=1, model__mlp_dim=mlp_dim)
  mesh = sharding.make_mesh(cfg.mesh)
  tx, _ = optim.build(cfg.optim, 10)
  _, _, shardings, init_fn = train.build_state(cfg, model_lib.config_from(cfg.model, 258), tx, mesh)
  state = init_fn()
  tree = {'params': state['params'], 'opt_state': state['opt_state']}
  total = sum(x.nbytes for x in jax.tree.leaves(tree))
  ratio = device_bytes(tree, jax.devices()[0]) / (total / 8)
  assert ratio <= 1.05, f'device 0 holds {ratio:.4f} x total / 8 ({total} bytes in all)'
  bias = shardings['params']['h'][0]['mlp']['c_fc_bias'].get_value().spec
  assert bias == (P('tensor') if mlp_dim else P(('tensor', 'fsdp'))), bias
