"""The ablation runner and report: grid expansion, skipping finished runs, aggregation, one real
tiny sweep."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SMALL, small_config
from experiments import ablate, report


def test_grid_expansion_and_commands():
  runs = ablate.expand([('optim.lr', ['1e-3', '3e-4']), ('train.init_from', ['', 'pre/s_{seed}'])], 2)
  assert len(runs) == 8 and [s for _, _, s in runs[:2]] == [0, 1]
  assert runs[0][0] == 'optim.lr=1e-3,train.init_from=' and runs[2][0] == \
      'optim.lr=1e-3,train.init_from=pre|s_{seed}'
  cmd = ablate.command('configs/demo.py', runs[3][1], 1, ['train.steps=5'], 'w')
  assert cmd[2:] == ['jaxft.train', '--config=configs/demo.py', '--workdir=w',
                     '--config.train.steps=5', '--config.optim.lr=1e-3',
                     '--config.train.init_from=pre/s_1', '--config.seed=1']
  assert '--config.train.init_from=' not in ' '.join(ablate.command('c', runs[0][1], 0, [], 'w'))
  # Only {seed} is filled in: a prompt template's {prompt} goes through as written.
  assert ablate.command('c', {}, 2, ['data.prompt_template=Q{seed}: {prompt} A:'], 'w')[-2:] == [
      '--config.data.prompt_template=Q2: {prompt} A:', '--config.seed=2']
  assert ablate.expand([], 3) == [('base', {}, 0), ('base', {}, 1), ('base', {}, 2)]
  with pytest.raises(SystemExit, match='expected key=value1,value2'):
    ablate.parse_sweep('optim.lr')



def test_an_empty_set_value_is_passed_and_one_without_equals_named(tmp_path):
  """`--set key=` sets the empty string (a sweep's empty value alone means the key's default)."""
  assert ablate.command('c', {}, 0, ['compile_cache='], 'w')[-2:] == [
      '--config.compile_cache=', '--config.seed=0']
  assert ablate.command('c', {'train.init_from': ''}, 0, ['train.init_from=x'], 'w')[-1:] == [
      '--config.seed=0']
  with pytest.raises(SystemExit, match=r"^--set 'train\.steps': expected key=value$"):
    ablate.main(['--config=configs/demo.py', '--set', 'train.steps', f'--out={tmp_path}'])

def fake_run(out, cell, seed, accuracy, losses):
  """A finished run directory as the runner leaves it."""
  wd = os.path.join(out, cell, f'seed_{seed}')
  os.makedirs(wd)
  json.dump(small_config(objective='classification').to_dict(), open(f'{wd}/config.json', 'w'))
  with open(f'{wd}/metrics.jsonl', 'w') as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({'step': step, 'split': 'train', 'loss': loss}) + '\n')
  final = {'loss': 1 - accuracy, 'accuracy': accuracy, 'confusion': [[1]]}
  json.dump({'cell': cell, 'overrides': {'train.trainable': cell, 'seed': seed},
             'final': {'val': final, 'test': final}, 'as_None': None}, open(f'{wd}/run.json', 'w'))
  json.dump({'val': final, 'test': final}, open(f'{wd}/summary.json', 'w'))
  return wd


def test_report_aggregates_seeds_into_tables_and_plots(tmp_path):
  out = str(tmp_path)
  for seed, acc in enumerate([0.8, 0.9, 1.0]):
    fake_run(out, 'head', seed, acc, [2.0, 1.0, 0.5])
  fake_run(out, 'all', 0, 0.5, [2.0, 1.5])
  table = report.write(out, ['train.trainable'])
  assert '| head | 3 | 0.9000 ± 0.1000 | 0.1000 ± 0.1000 |' in table  # accuracy, loss (ddof 1).
  assert '| all | 1 | 0.5000 | 0.5000 |' in table  # One seed: no ± (a 0 spread would mislead).
  assert open(tmp_path / 'results.md').read() == table
  rows = list(csv.DictReader(open(tmp_path / 'results.csv')))
  assert {r['cell']: float(r['accuracy mean']) for r in rows} == {'all': 0.5, 'head': pytest.approx(0.9)}
  assert [r['accuracy std'] for r in rows if r['cell'] == 'all'] == ['']
  for png in ('learning_curves.png', 'final_vs_train.trainable.png'):
    assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'
  # The command line takes --keys in both forms.
  os.remove(tmp_path / 'final_vs_train.trainable.png')
  subprocess.run([sys.executable, '-m', 'experiments.report', out, '--keys', 'train.trainable'],
                 cwd=ROOT, check=True, capture_output=True)
  assert (tmp_path / 'final_vs_train.trainable.png').is_file()



def test_report_plots_a_metric_every_cell_has(tmp_path, monkeypatch):
  """final_vs_<key> plots one metric for all cells, on its y axis: the loss where labeled_pair's
  exact match was skipped (train.exact_match_examples=0); the --eval-as score where the cells'
  objectives differ."""
  import matplotlib.axes
  plotted = []
  real_errorbar, real_ylabel = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.set_ylabel
  monkeypatch.setattr(matplotlib.axes.Axes, 'errorbar', lambda ax, x, y, **kw: (
      plotted.append((kw['label'], y[0])), real_errorbar(ax, x, y, **kw))[1])
  monkeypatch.setattr(matplotlib.axes.Axes, 'set_ylabel', lambda ax, label, **kw: (
      plotted.append(label), real_ylabel(ax, label, **kw))[1])

  def fake(out, cell, objective, test, as_labeled_pair=None):
    wd = os.path.join(out, cell, 'seed_0')
    os.makedirs(wd)
    json.dump({'objective': objective}, open(f'{wd}/config.json', 'w'))
    open(f'{wd}/metrics.jsonl', 'w').write(json.dumps({'step': 1, 'split': 'train', 'loss': 1.0}))
    json.dump({'cell': cell, 'overrides': {'objective': objective, 'seed': 0},
               'final': {'val': test, 'test': test},
               'as_labeled_pair': as_labeled_pair and {'val': as_labeled_pair,
                                                       'test': as_labeled_pair}},
              open(f'{wd}/run.json', 'w'))
  no_em = str(tmp_path / 'no_em')
  for cell, loss in (('a', 0.9), ('b', 0.8)):
    fake(no_em, cell, 'labeled_pair', {'loss': loss, 'perplexity': 2.4})
  report.write(no_em, ['objective'])
  assert plotted == ['train loss', ('a', 0.9), ('b', 0.8), 'final test loss']
  plotted.clear()
  mixed = str(tmp_path / 'mixed')
  fake(mixed, 'pair', 'labeled_pair', {'loss': 0.9, 'exact_match': 0.14},
       {'loss': 0.9, 'exact_match': 0.14})
  fake(mixed, 'lm', 'next_token', {'loss': 1.3}, {'loss': 1.0, 'exact_match': 0.1})
  report.write(mixed, ['objective'])
  assert plotted == ['train loss', ('lm', 0.1), ('pair', 0.14),
                     'final test exact_match (as_labeled_pair)']
  assert (tmp_path / 'mixed' / 'final_vs_objective.png').read_bytes()[:4] == b'\x89PNG'

def test_finished_runs_are_skipped_if_they_ran_these_settings(tmp_path, monkeypatch):
  wd = fake_run(str(tmp_path), 'cell', 0, 0.5, [1.0])
  os.remove(os.path.join(wd, 'run.json'))
  monkeypatch.setattr(ablate.subprocess, 'run', lambda *a, **k: pytest.fail('ran again'))
  monkeypatch.setattr(ablate, 'git_commit', lambda: 'abc')
  sets = [f'{k}={v}' for k, v in SMALL.items()] + ['objective=classification']  # fake_run's.
  assert ablate.run_one('configs/demo.py', 'cell', {}, 0, sets, str(tmp_path), None) == wd
  record = json.load(open(os.path.join(wd, 'run.json')))
  assert record['git_commit'] == 'abc' and len(record['data_fingerprint']) == 16
  # The process's own settings (config.PROCESS_ONLY) change no result: still reused.
  process = ['reuse_host_memory=True', 'threefry_gpu_kernel=True', f'compile_cache={tmp_path}']
  assert ablate.run_one('configs/demo.py', 'cell', {}, 0, sets + process, str(tmp_path),
                        None) == wd
  # A failing --eval-as evaluation stops the sweep with evaluate's own error.
  failed = subprocess.CompletedProcess([], 1, '', 'error: --objective=next_token needs ...')
  monkeypatch.setattr(ablate.subprocess, 'run', lambda *a, **k: failed)
  with pytest.raises(RuntimeError, match=r'cell/seed_0: evaluate --split=val '
                     r'--objective=next_token failed \(exit 1\): error: --objective=next_token'):
    ablate.run_one('configs/demo.py', 'cell', {}, 0, sets, str(tmp_path), 'next_token')
  # Other settings into the same --out: refused, naming them, rather than reusing the result.
  with pytest.raises(RuntimeError, match=r"cell/seed_0 holds a finished run of other settings "
                     r"\(optim\.lr: 0\.002 there, 0\.01 now; train\.steps: 400 there, 8 now\)"):
    ablate.run_one('configs/demo.py', 'cell', {'optim.lr': '0.01'}, 0, sets + ['train.steps=8'],
                   str(tmp_path), None)


def test_a_sweep_key_that_does_not_exist_stops_the_sweep_before_any_run(tmp_path, monkeypatch):
  """`--sweep optim.lrr=1,2` ran a first cell to its failure, the nearest key only in its
  train.log: every run's settings are now checked first."""
  monkeypatch.setattr(ablate.subprocess, 'run', lambda *a, **k: pytest.fail('a run started'))
  with pytest.raises(RuntimeError, match=r"^optim\.lr=1,optim\.lrr=1: unknown config key "
                     r"'optim\.lrr'; did you mean optim\.lr"):
    ablate.main(['--config=configs/demo.py', '--sweep', 'optim.lr=1,2', '--sweep', 'optim.lrr=1,2',
                 f'--out={tmp_path}'])
  with pytest.raises(RuntimeError, match=r"bad value for config key 'train\.steps': 'many'"):
    ablate.main(['--config=configs/demo.py', '--sweep', 'train.steps=10,many',
                 f'--out={tmp_path}'])
  assert os.listdir(tmp_path) == []  # No cell directory made.


@pytest.fixture
def default_sigint():
  """Ctrl-C raises KeyboardInterrupt, as in a terminal, however pytest was started (a script's
  background job, `pytest &`, starts with SIGINT ignored)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_sweep_and_a_run_stopped_early_is_named(tmp_path, monkeypatch,
                                                                  default_sigint):
  started = []

  def run_one(config, name, *rest):  # As the run that gets the Ctrl-C (with the whole group).
    started.append(name)
    os.kill(os.getpid(), signal.SIGINT)  # Raised in the main thread, waiting on the runs.
    time.sleep(0.5)
    return os.path.join(str(tmp_path), name)
  monkeypatch.setattr(ablate, 'run_one', run_one)
  with pytest.raises(SystemExit, match='interrupted: the runs in progress saved a checkpoint'):
    ablate.main(['--config=configs/demo.py', '--sweep', 'optim.lr=1e-3,3e-4', '--out',
                 str(tmp_path)])
  assert started == ['optim.lr=1e-3']  # The queued run never started.
  # A run that saved and exited 0 before its last step (its summary.json not written).
  monkeypatch.undo()
  monkeypatch.setattr(ablate.subprocess, 'run', lambda *a, **k: subprocess.CompletedProcess(a, 0))
  with pytest.raises(RuntimeError, match=r'cell/seed_0: training stopped before its last step '
                     r'\(SIGTERM or Ctrl-C\), see .*train\.log; rerun the same command'):
    ablate.run_one('configs/demo.py', 'cell', {}, 0, [], str(tmp_path), None)


def test_tiny_real_sweep_end_to_end(tmp_path, capsys):
  out = str(tmp_path / 'sweep')
  sets = [f'{k}={v}' for k, v in {**SMALL, 'train.steps': '3', 'train.eval_every': '3'}.items()]
  argv = ['--config=configs/demo.py:classification', '--sweep', 'train.trainable=all,head',
          '--seeds', '1', '--out', out] + [a for s in sets for a in ('--set', s)]
  ablate.main(argv)
  records = [json.load(open(f'{out}/{c}/seed_0/run.json'))
             for c in ('train.trainable=all', 'train.trainable=head')]
  assert records[0]['data_fingerprint'] == records[1]['data_fingerprint']
  assert records[0]['git_commit'] == records[1]['git_commit'] is not None
  assert 0 <= records[1]['final']['test']['accuracy'] <= 1
  assert 'accuracy' in open(f'{out}/results.md').read()
  log = os.path.getsize(f'{out}/train.trainable=all/seed_0/train.log')
  ablate.main(argv)  # Everything finished: nothing reruns.
  assert os.path.getsize(f'{out}/train.trainable=all/seed_0/train.log') == log


def test_hlo_traffic_counts_each_kernels_operands_and_results(tmp_path, capsys):
  """experiments/hlo_traffic.py on a compiled program whose kernels are known: x * 2 + y over
  f32[1000, 1000] is one fusion reading x and y and writing the result (12 MB); summed over rows
  it is a reduce fusion reading 4 MB and writing 4 KB."""
  import jax
  import jax.numpy as jnp
  from experiments import hlo_traffic
  x = jax.ShapeDtypeStruct((1000, 1000), jnp.float32)
  text = lambda f, *a: jax.jit(f).lower(*a).compile().as_text()
  rows = hlo_traffic.traffic(text(lambda x, y: x * 2 + y, x, x))
  assert [r[0] for r in rows] == [12_000_000]
  rows = hlo_traffic.traffic(text(lambda x: (x * 2).sum(1), x))
  assert sum(r[0] for r in rows) == 4_004_000
  path = tmp_path / 'hlo.txt'
  path.write_text(text(lambda x, y: x * 2 + y, x, x))
  hlo_traffic.main([str(path), '--top=3'])
  out = capsys.readouterr().out.splitlines()
  assert out[0] == '0.012 GB over 1 ops; 0.0 ms at 3.35 TB/s'
  assert out[1].split()[:2] == ['0.012', 'GB'] and 'jit(<lambda>)/' in out[1]
