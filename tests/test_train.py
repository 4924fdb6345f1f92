"""End-to-end runs of `python -m jaxft.train` on the small demo config (8 fake devices); faults
are in test_faults.py, bad input in test_bad_input.py."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import small_argv
from experiments.kill_resume import read_params
from jaxft import checkpoint, config as config_lib, data, evaluate, train


def metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_run_writes_metrics_tensorboard_config_and_checkpoints(tmp_path, capsys):
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, train__steps=10, checkpoint__every=5, checkpoint__keep=1,
                        train__eval_batches=1))
  lines = metrics(wd)
  trains = [l for l in lines if l['split'] == 'train']
  assert [l['step'] for l in trains] == list(range(1, 11))
  for key in ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'supervised_tokens', 'total_tokens'):
    assert all(isinstance(l[key], float) for l in trains), key
  # Real tokens only: packed rows end in padding, which is neither counted nor supervised.
  assert trains[-1]['total_tokens'] == sum(l['tokens'] for l in trains)
  assert 0.8 * 10 * 16 * 32 < trains[-1]['total_tokens'] <= 10 * 16 * 32
  assert trains[-1]['total_supervised_tokens'] == sum(l['supervised_tokens'] for l in trains)
  evals = [(l['step'], l['split']) for l in lines if l['split'] != 'train']
  assert evals == [(5, 'val'), (10, 'val'), (10, 'test')]
  assert trains[-1]['loss'] < trains[0]['loss']
  assert glob.glob(os.path.join(wd, 'tb', 'events.out.tfevents.*'))
  assert json.load(open(os.path.join(wd, 'config.json')))['train']['steps'] == 10
  # keep=1 keeps the newest (10); keep_best keeps the lower val loss, also step 10 here.
  assert ocp.utils.checkpoint_steps(os.path.join(wd, 'checkpoints')) == [10]
  out = capsys.readouterr().out
  assert 'step 10 test: loss' in out and 'baselines: unigram_loss' in out
  assert 'never reaches optim.lr' not in out  # Warm-up 2 of 10 steps.
  # keep_best's val loss is on disk (a resume compares with it) and, at the end too, is that of
  # the capped evaluations (train.eval_batches), not the whole split's: evaluate so capped agrees.
  assert json.load(open(os.path.join(wd, 'eval', 'val_10.json')))['batches'] == 'all'
  stored = json.load(open(os.path.join(wd, 'checkpoints', '10', 'metrics', 'metrics')))
  evaluate.main(['--workdir', wd, '--split', 'val', '--config.train.eval_batches=1'])
  capped = json.load(open(glob.glob(os.path.join(wd, 'eval', 'val_*_10.json'))[0]))
  assert capped['batches'] == 1 and stored['val_loss'] == pytest.approx(capped['metrics']['loss'])
  whole = json.load(open(os.path.join(wd, 'eval', 'val_10.json')))['metrics']['loss']
  assert stored['val_loss'] != whole
  train.main(small_argv(wd, train__steps=10, train__eval_batches=1))  # Resumes at the end: done.
  assert 'already holds the final step 10' in capsys.readouterr().out
  assert len(metrics(wd)) == len(lines)
  # A warm-up as long as the run is told of (it would be a silent lr that never peaks).
  train.main(small_argv(str(tmp_path / 'short'), train__steps=2, train__eval_batches=1))
  assert ('note: optim.warmup_steps=2 >= train.steps=2: the learning rate rises for the whole run '
          'and never reaches optim.lr=') in capsys.readouterr().out
  # Fewer steps than the checkpoint's: refused, and the record of what was run left as it was.
  capsys.readouterr()
  with pytest.raises(config_lib.ConfigError, match=r'train.steps=4 is below the step of .*checkpoint, 10'):
    train.main(small_argv(wd, train__steps=4, train__eval_batches=1))
  assert 'resumed from' not in capsys.readouterr().out  # Refused before the restore.
  assert json.load(open(os.path.join(wd, 'config.json')))['train']['steps'] == 10
  # Killed between the final checkpoint and summary.json, with a summary.json left from a shorter
  # run (of another step, not this one's): the rerun evaluates and writes it.
  summary = json.load(open(os.path.join(wd, 'summary.json')))
  json.dump({**summary, 'steps': 5}, open(os.path.join(wd, 'summary.json'), 'w'))
  train.main(small_argv(wd, train__steps=10, checkpoint__every=5, checkpoint__keep=1,
                        train__eval_batches=1))
  again = json.load(open(os.path.join(wd, 'summary.json')))
  assert (again['steps'], again['test']) == (10, summary['test'])
  lines = metrics(wd)
  # More steps resume the run, and the log says what changed. Not another train.eval_batches:
  # keep_best's val losses would be of other records than the saved ones'.
  with pytest.raises(config_lib.ConfigError, match=r'train.eval_batches: run 1 vs now 2 '
                     r'\(checkpoint.keep_best ranks saves by the val loss of this many batches\)'):
    train.main(small_argv(wd, train__steps=12))
  train.main(small_argv(wd, train__steps=12, train__eval_every=6, train__eval_batches=1))
  out = capsys.readouterr().out
  assert (f'resumed from {wd}/checkpoints/10; checkpoint.every 5 -> 100; checkpoint.keep 1 -> 3; '
          f'train.eval_every 5 -> 6; train.steps 10 -> 12; the lr '
          f'schedule now ends at the new train.steps') in out
  assert [l['step'] for l in metrics(wd) if l['split'] == 'train'][-3:] == [10, 11, 12]
  assert json.load(open(os.path.join(wd, 'config.json')))['train']['steps'] == 12


def test_compile_cache_loads_the_step_on_a_rerun_and_recompiles_a_broken_entry(tmp_path, root):
  """compile_cache: a second run of the same config loads the compiled train step from the cache
  (XLA does not compile it again) and trains the same losses; an entry cut short (a kill
  mid-write) is warned about and compiled afresh, with the same losses again."""
  cache = tmp_path / 'xla'
  # Hits are logged; conftest's environment has every compile kept (jax keeps only those over
  # 1 s by default), and the compile_cache given here takes the place of its session cache.
  env = {**os.environ, 'JAX_LOG_COMPILES': '1'}

  def run(name):
    wd = str(tmp_path / name)
    done = subprocess.run([sys.executable, '-m', 'jaxft.train',
                           *small_argv(wd, train__steps=3, compile_cache=cache)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [l['loss'] for l in metrics(wd) if l['split'] == 'train'], done.stderr

  hit = "Persistent compilation cache hit for 'jit_train_step'"
  first, log = run('first')
  assert hit not in log
  [entry] = glob.glob(str(cache / 'jit_train_step-*'))
  second, log = run('second')
  assert hit in log and second == first
  with open(entry, 'r+b') as f:
    f.truncate(os.path.getsize(entry) // 2)
  third, log = run('third')
  assert "Error reading persistent compilation cache entry for 'jit_train_step'" in log
  assert third == first


def test_metrics_log_writes_tensorboard_without_importing_torch(tmp_path):
  """tensorboardX imports torch when it is installed (here it is, for the HF tests): the run's
  writer keeps it out, ~4 s off every run's start."""
  code = ('import sys; from jaxft import train; log = train.MetricsLog(sys.argv[1], 0); '
          'log.write(1, "train", {"loss": 2.5}); log.close(); print("torch" in sys.modules)')
  done = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True,
                        text=True, check=True)
  assert done.stdout.split()[-1] == 'False', done.stderr
  [events] = glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*'))
  assert b'train/loss' in open(events, 'rb').read()
  import torch  # In a process that has it, it is left as it was.
  train.summary_writer(str(tmp_path / 'tb2')).close()
  assert sys.modules['torch'] is torch


def test_the_final_step_is_saved_before_the_final_evaluations(tmp_path, monkeypatch, capsys):
  """Stopped during the evaluations of whole splits at the end (a preemption, Ctrl-C), the run
  has lost no step: the rerun only evaluates."""
  wd = str(tmp_path / 'run')
  capped = evaluate.Evaluator.__call__

  def interrupted(self, params, split, max_batches=0):
    if max_batches == 0:
      raise KeyboardInterrupt
    return capped(self, params, split, max_batches)
  monkeypatch.setattr(evaluate.Evaluator, '__call__', interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.main(small_argv(wd, train__steps=3, checkpoint__every=100))
  assert ocp.utils.checkpoint_steps(os.path.join(wd, 'checkpoints')) == [3]
  monkeypatch.undo()
  train.main(small_argv(wd, train__steps=3, checkpoint__every=100))
  assert f'resumed from {wd}/checkpoints/3' in capsys.readouterr().out
  assert [(l['step'], l['split']) for l in metrics(wd)] == [
      (1, 'train'), (2, 'train'), (3, 'train'), (3, 'val'), (3, 'test')]
  assert json.load(open(os.path.join(wd, 'summary.json')))['steps'] == 3


def test_keep_best_ranks_every_save_and_init_from_names_an_unfinished_one(tmp_path):
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, train__steps=6, train__eval_every=5, checkpoint__every=2,
                        checkpoint__keep=3, train__eval_batches=1))
  # Saves off the eval cadence (2, 4) are ranked too, each by its own val loss.
  assert sorted(ocp.utils.checkpoint_steps(os.path.join(wd, 'checkpoints'))) == [2, 4, 6]
  losses = [json.load(open(os.path.join(wd, 'checkpoints', str(s), 'metrics', 'metrics')))
            ['val_loss'] for s in (2, 4, 6)]
  assert len(set(losses)) == 3 and all(np.isfinite(losses))
  # An orbax write still under way is not a checkpoint to start from.
  os.makedirs(os.path.join(wd, 'checkpoints', '8.orbax-checkpoint-tmp', 'params'))
  with pytest.raises(FileNotFoundError, match=r'8.orbax-checkpoint-tmp is not a finished '
                     r'checkpoint \(finished steps there: 2, 4, 6\)'):
    train.main(small_argv(str(tmp_path / 'ft'), train__steps=1,
                          train__init_from=os.path.join(wd, 'checkpoints', '8.orbax-checkpoint-tmp')))


def test_resume_refuses_held_out_records_that_changed(tmp_path, capsys):
  """keep_best compares val losses across a resume: they must be of the same records."""
  files = {}
  for split, n in (('train', 300), ('val', 40), ('test', 40)):
    files[split] = tmp_path / f'{split}.jsonl'
    files[split].write_text(''.join(json.dumps({'text': f'{split} {i} + {i % 9}'}) + '\n'
                                    for i in range(n)))
  argv = lambda steps: small_argv(str(tmp_path / 'run'), data__source='files', train__steps=steps,
                                  checkpoint__every=2, **{f'data__{s}': str(f)
                                                          for s, f in files.items()})
  train.main(argv(2))
  # Moved (another disk, a bucket): the same records under other names resume.
  os.rename(tmp_path / 'train.jsonl', tmp_path / 'moved.jsonl')
  files['train'] = tmp_path / 'moved.jsonl'
  train.main(argv(3))
  assert f"data.train '{tmp_path}/train.jsonl' -> '{tmp_path}/moved.jsonl'" in \
      capsys.readouterr().out
  # Other records under a new name are not: the data position is of the saved ones.
  (tmp_path / 'other.jsonl').write_text(files['train'].read_text() + '{"text": "new"}\n')
  with pytest.raises(data.DataError, match=r"data position is for other train data \(checkpoint "
                     r"vs this run: records 300 vs 301"):
    train.main(small_argv(str(tmp_path / 'run'), data__source='files', train__steps=4,
                          data__train=str(tmp_path / 'other.jsonl'), data__val=str(files['val']),
                          data__test=str(files['test'])))
  with open(files['val'], 'a') as f:
    f.write(json.dumps({'text': 'one more'}) + '\n')
  with pytest.raises(data.DataError, match=r'the val records differ from those the run was '
                     r'evaluated on before'):
    train.main(argv(4))


def test_processes_must_split_the_batch_rows(monkeypatch):
  """Each process loads its own rows: a mesh whose batch axes do not span the processes would
  take one process's rows for the whole batch."""
  from conftest import small_config
  from jaxft import sharding
  cfg = small_config(mesh__data=1, mesh__fsdp=1, mesh__tensor=8)
  mesh = sharding.make_mesh(cfg.mesh)
  train.check_batch(cfg, mesh)
  monkeypatch.setattr(train.jax, 'process_count', lambda: 2)
  with pytest.raises(config_lib.ConfigError, match=r'mesh.data x mesh.fsdp = 1 must be a '
                     r'multiple of the 2 processes'):
    train.check_batch(cfg, mesh)
  split = small_config(mesh__data=2, mesh__fsdp=1, mesh__tensor=4)
  train.check_batch(split, sharding.make_mesh(split.mesh))


def test_init_from_loads_params_with_fresh_optimizer(tmp_path, capsys, monkeypatch):
  src = str(tmp_path / 'src')
  # Given as ~/src, which no shell expands in --workdir=~/src: the home directory's src.
  monkeypatch.setenv('HOME', str(tmp_path))
  train.main(small_argv('~/src', train__steps=4))
  assert not os.path.exists('~') and os.path.isfile(os.path.join(src, 'summary.json'))
  dst = str(tmp_path / 'dst')
  # lr 0 leaves params untouched: the run's checkpoint must hold exactly the source params.
  train.main(small_argv(dst, train__steps=1, train__init_from='~/src', optim__lr=0.0))
  assert (f'init_from {src}/checkpoints/4 (fresh optimizer): loaded 28 params (listed in '
          f'init_from.json); new (freshly initialised): none; not used: none'
          ) in capsys.readouterr().out
  a, b = read_params(src), read_params(dst)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  opt = ocp.PyTreeCheckpointer().restore(os.path.join(dst, 'checkpoints', '1', 'train'))
  assert int(opt['step']) == 1  # The step counter restarted: a fresh optimizer, not a resume.
  # A checkpoint of another model size is refused with the differences listed.
  bad = str(tmp_path / 'bad')
  with pytest.raises(checkpoint.CheckpointMismatch, match=r'(?s)40 differences.*c_attn_kernel: '
                     r'checkpoint \(32, 3, 4, 8\) vs model \(64, 3, 4, 16\).*and 20 more'):
    train.main(small_argv(bad, train__steps=1, train__init_from=src,
                          model__embed_dim=64, model__num_layers=3))
  assert not os.path.exists(os.path.join(bad, 'config.json'))
  # Resuming src with a config that does not fit its checkpoint leaves its record untouched.
  before = open(os.path.join(src, 'config.json')).read()
  with pytest.raises(config_lib.ConfigError, match=r'model\.embed_dim: run 32 vs now 64'):
    train.main(small_argv(src, train__steps=8, model__embed_dim=64))
  assert open(os.path.join(src, 'config.json')).read() == before


def test_finetune_other_objectives_from_next_token(tmp_path, capsys):
  """Pre-train next_token, then labeled_pair (full) and classification (frozen backbone) from it:
  heads start fresh, backbones load, each objective's eval lands in metrics.jsonl and eval/."""
  pre = str(tmp_path / 'pre')
  train.main(small_argv(pre, train__steps=4))
  capsys.readouterr()
  lp = str(tmp_path / 'lp')
  train.main(small_argv(lp, objective='labeled_pair', train__steps=4, train__eval_every=2,
                        train__init_from=pre, train__exact_match_examples=20))
  assert 'loaded 28 params (listed in init_from.json); new (freshly initialised): none' in \
      capsys.readouterr().out
  result = json.load(open(os.path.join(lp, 'eval', 'val_2.json')))
  assert result['objective'] == 'labeled_pair' and result['batches'] == 2
  assert result['metrics']['exact_match_examples'] == 20
  assert 0 <= result['metrics']['exact_match'] <= 1 and result['metrics']['perplexity'] > 1
  # Always the most common train answer, scored on the 20 questions exact match scores.
  constant = result['baselines']['constant_exact_match']
  assert 0 <= constant < 0.2 and constant * 20 == round(constant * 20)
  trains = [l for l in metrics(lp) if l['split'] == 'train']
  assert 0 < trains[-1]['total_supervised_tokens'] < 0.6 * trains[-1]['total_tokens']
  assert [l['split'] for l in metrics(lp) if l['step'] == 4] == ['train', 'val', 'test']

  cls = str(tmp_path / 'cls')
  train.main(small_argv(cls, objective='classification', train__steps=4, train__eval_every=2,
                        train__init_from=pre, train__trainable='head'))
  out = capsys.readouterr().out
  assert 'new (freshly initialised): score; not used: none' in out
  report = json.load(open(os.path.join(cls, 'init_from.json')))
  assert report['new'] == ['score'] and len(report['loaded']) == 28 and 'wte' in report['loaded']
  assert re.search(r'num_labels=3\) with [\d,]+ params, 96 trainable', out)  # score: 32 x 3.
  for split in ('val', 'test'):
    result = json.load(open(os.path.join(cls, 'eval', f'{split}_4.json')))
    cm = np.array(result['metrics']['confusion'])
    assert cm.shape == (3, 3) and cm.sum() == result['metrics']['supervised_tokens']
    assert result['metrics']['accuracy'] == pytest.approx(np.trace(cm) / cm.sum())
    assert result['label_names'] == ['low', 'mid', 'high']
    assert 0.3 < result['baselines']['majority_accuracy'] < 0.6
  trains = [l for l in metrics(cls) if l['split'] == 'train']
  assert [l['supervised_tokens'] for l in trains] == [16.0] * 4  # One label per sequence.
  before, after = read_params(pre), read_params(cls)
  assert set(after) - set(before) == {'score/value'}
  for k in before:  # The frozen backbone is bit for bit the pre-trained one.
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)

  back = str(tmp_path / 'back')  # And a classification checkpoint feeds a next_token run.
  train.main(small_argv(back, train__steps=1, train__init_from=cls))
  assert 'new (freshly initialised): none; not used: score' in capsys.readouterr().out
  with pytest.raises(config_lib.ConfigError, match=r"trainable='head' needs a head"):
    train.main(small_argv(str(tmp_path / 'x'), train__trainable='head'))
  with pytest.raises(config_lib.ConfigError, match=r"trainable='nothing' matches no parameter"):
    train.main(small_argv(str(tmp_path / 'y'), train__trainable='nothing'))
  with pytest.raises(config_lib.ConfigError, match=r"trainable='h/\(' is not a regex"):
    train.main(small_argv(str(tmp_path / 'z'), train__trainable='h/('))


def test_resume_onto_a_different_mesh(tmp_path, capsys):
  """A checkpoint written on an (8,1,1) mesh resumes on (2,2,2) and lands where (8,1,1) does."""
  import shutil
  a = str(tmp_path / 'a')
  opts = dict(train__steps=8, checkpoint__every=4, checkpoint__keep=5, checkpoint__keep_best=False)
  train.main(small_argv(a, **opts))
  b = str(tmp_path / 'b')
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, 'checkpoints', '8'))
  with open(os.path.join(b, 'metrics.jsonl'), 'a') as f:  # As a kill mid-write leaves it.
    f.write('{"step": 9, "split": "train", "lo')
  train.main(small_argv(b, mesh__data=2, mesh__fsdp=2, mesh__tensor=2, **opts))
  out = capsys.readouterr().out
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out and 'checkpoints/4' in out
  assert 'metrics.jsonl: dropping its unfinished last line \'{"step": 9, "split": "train", "lo\'' \
      in out
  assert [l['step'] for l in metrics(b) if l['split'] == 'train'] == list(range(1, 9))
  pa, pb = read_params(a), read_params(b)
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize('moments', ['float32', 'int8'])
def test_frozen_backbone_resumes_bitwise_on_a_sharded_mesh(tmp_path, capsys, moments):
  """train.trainable='head' on a data x fsdp x tensor mesh: the frozen params' optimizer state
  (optax MaskedNodes) has nothing to place, and a run stopped at step 3 resumes to end bit for
  bit where the uninterrupted one does, its backbone untouched."""
  import shutil
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  opts = dict(objective='classification', train__trainable='head', optim__moments_dtype=moments,
              train__steps=6, checkpoint__every=3, checkpoint__keep=5, checkpoint__keep_best=False,
              mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  train.main(small_argv(a, **opts))
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, 'checkpoints', '6'))
  train.main(small_argv(b, **opts))
  assert f'resumed from {b}/checkpoints/3' in capsys.readouterr().out
  start, pa, pb = read_params(a, 3), read_params(a), read_params(b)
  assert pa.keys() == pb.keys() and len(pa) == 29
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    if k != 'score/value':
      np.testing.assert_array_equal(start[k], pa[k], err_msg=k)
  assert not np.array_equal(start['score/value'], pa['score/value'])
  same = lambda wd: [(l['step'], l['loss'], l['grad_norm']) for l in metrics(wd)
                     if l['split'] == 'train']
  assert same(a) == same(b) and len(same(a)) == 6


def test_trains_on_jsonl_files_with_held_out_splits(tmp_path, capsys):
  src = tmp_path / 'corpus.jsonl'
  lines = [json.dumps({'body': f'the {i} cat sat on the {i % 7} mat. '}) for i in range(400)]
  lines[10], lines[20] = '{"body": broken', json.dumps({'text': 'no body field'})
  src.write_text(''.join(l + '\n' for l in lines))
  wd = str(tmp_path / 'files')
  train.main(small_argv(wd, data__source='files', data__train=str(src), data__text_field='body',
                        data__val_fraction=0.1, data__test_fraction=0.1, train__steps=3,
                        data__on_error='skip'))
  out = capsys.readouterr().out
  assert 'step 3 test: loss' in out
  assert {l['split'] for l in metrics(wd)} == {'train', 'val', 'test'}
  # The two bad lines are named, counted in the split's log line and listed in the workdir.
  assert re.search(rf'train \(next_token\): 3\d\d records, tokenized as drawn .* [12] bad records '
                   rf'skipped \(first: {src}:11: malformed', out), \
      [l for l in out.splitlines() if ' records' in l]
  skipped = open(os.path.join(wd, 'skipped_records.txt')).read().splitlines()
  assert len(skipped) == 2 and skipped[0].startswith(f'train\t{src}:11: malformed JSON line')
  assert re.match(rf"(train|val|test)\t{src}:21: missing field 'body'", skipped[1])
  # A rerun refused for other data leaves the list of what this run skipped alone.
  other = tmp_path / 'other.jsonl'
  other.write_text(''.join(l + '\n' for l in lines[:300] + ['{"body": also broken']))
  with pytest.raises(data.DataError, match='the val and test records differ from those the run '
                     'was evaluated on'):
    train.main(small_argv(wd, data__source='files', data__train=str(other), data__text_field='body',
                          data__val_fraction=0.1, data__test_fraction=0.1, train__steps=3,
                          data__on_error='skip'))
  assert open(os.path.join(wd, 'skipped_records.txt')).read().splitlines() == skipped
