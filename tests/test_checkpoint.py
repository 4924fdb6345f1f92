import json
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from conftest import small_argv
from jaxft import checkpoint, data, train


def test_keeps_newest_n_plus_best_val_loss(tmp_path):
  cfg = ml_collections.ConfigDict({'keep': 2, 'keep_best': True, 'async_save': True})
  mngr = checkpoint.manager(str(tmp_path), cfg)
  for step, val_loss in [(1, 3.0), (2, 0.5), (3, 2.0), (4, 1.0), (5, None), (6, 4.0)]:
    state = {'params': {'w': np.full(3, step, np.float32)}, 'step': np.int32(step)}
    checkpoint.save(mngr, state, {'iterator': {'next_index': step}},
                    None if val_loss is None else {'val_loss': val_loss})
  mngr.wait_until_finished()
  assert sorted(ocp.utils.checkpoint_steps(str(tmp_path / 'checkpoints'))) == [2, 5, 6]
  restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / 'checkpoints' / '2' / 'params'))
  np.testing.assert_array_equal(restored['w'], [2, 2, 2])
  mngr.close()
  # A resumed run (a new manager) still knows step 2 is the best: its val loss is on disk.
  mngr = checkpoint.manager(str(tmp_path), cfg)
  for step in (7, 8):
    state = {'params': {'w': np.full(3, step, np.float32)}, 'step': np.int32(step)}
    checkpoint.save(mngr, state, {'iterator': {'next_index': step}}, {'val_loss': 9.0})
  mngr.wait_until_finished()
  assert sorted(ocp.utils.checkpoint_steps(str(tmp_path / 'checkpoints'))) == [2, 7, 8]
  # A NaN val loss ranks last: it does not displace the best.
  for step in (9, 10):
    state = {'params': {'w': np.full(3, step, np.float32)}, 'step': np.int32(step)}
    checkpoint.save(mngr, state, {'iterator': {'next_index': step}}, {'val_loss': float('nan')})
  mngr.wait_until_finished()
  assert sorted(ocp.utils.checkpoint_steps(str(tmp_path / 'checkpoints'))) == [2, 9, 10]
  mngr.close()


def test_saving_replicated_arrays_compiles_nothing(tmp_path):
  """One process writes each replicated array whole: orbax's replica-parallel save would compile
  a slice program per array shape and device (a 2-layer model on 8 devices: 240, 20 s)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  replicated = NamedSharding(Mesh(jax.devices(), ('data',)), P())
  params = {f'w{n}': jax.device_put(np.arange(8 * n, dtype=np.float32).reshape(8, n), replicated)
            for n in (1, 2, 3)}
  compiles = []
  listener = lambda event, seconds, **_: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mngr = checkpoint.manager(str(tmp_path), ml_collections.ConfigDict(
        {'keep': 1, 'keep_best': False, 'async_save': True}))
    checkpoint.save(mngr, {'params': params, 'step': np.int32(1)}, {'iterator': {}})
    mngr.wait_until_finished()
    mngr.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert '/jax/core/compile/backend_compile_duration' not in compiles
  restored = ocp.PyTreeCheckpointer().restore(
      str(tmp_path / 'checkpoints' / '1' / 'params'),
      restore_args={k: ocp.RestoreArgs(restore_type=np.ndarray) for k in params})
  for k, v in params.items():
    np.testing.assert_array_equal(restored[k], np.asarray(v))


def test_a_run_from_before_split_seed_is_read_with_the_data_its_seed_drew(tmp_path):
  """A config.json without data.split_seed is a run whose demo corpus and held-out records
  followed its `seed`: evaluate / to-hf read it so, not with split_seed 0's records."""
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, seed=1, data__split_seed=1, train__steps=1))  # As such a run drew.
  path = os.path.join(wd, 'config.json')
  saved = json.load(open(path))
  del saved['data']['split_seed']
  json.dump(saved, open(path, 'w'))
  cfg, directory, step = checkpoint.run_config(wd)
  assert cfg.data.split_seed == 1
  held_out = checkpoint.resume_data(directory, step)['held_out']
  splits = data.load_splits(cfg.data)
  assert {s: data.fingerprint(splits[s]) for s in ('val', 'test')} == held_out
