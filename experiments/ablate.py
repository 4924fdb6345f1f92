"""Ablation runner: a grid of config overrides x seeds, each run a `python -m jaxft.train`.

    python -m experiments.ablate --config=configs/demo.py:classification \
        --sweep optim.lr=1e-3,3e-4 --sweep train.trainable=all,head --seeds 3 --out runs/lr_vs_frozen \
        [--set train.steps=200] [--jobs 2]

`--eval-as OBJECTIVE` also scores each finished run as another objective on the same model (a
next_token run as labeled_pair: exact match of greedy completions).

Sweep values may use {seed} (e.g. --sweep train.init_from=,runs/pre/seed_{seed}; an empty value
leaves the key at its default, while --set key= sets it to the empty string). Finished runs
(summary.json present) are skipped if they ran the config these settings give (else it is an
error naming the keys), interrupted ones resume from their checkpoint. Each run directory gets
run.json: its overrides, the git commit, a fingerprint of its data and the final metrics. Then
results.md / results.csv (mean +- std over seeds per cell) and plots are written to --out (see
experiments/report.py).
"""
import argparse
import concurrent.futures
import hashlib
import itertools
import json
import os
import subprocess
import sys

from experiments import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_sweep(text):
  key, _, values = text.partition('=')
  if not key or not values:
    raise SystemExit(f'--sweep {text!r}: expected key=value1,value2,...')
  return key, values.split(',')


def parse_set(text):
  """A --set, checked and kept as written (run.json records it); `key=` sets the empty string."""
  key, eq, _ = text.partition('=')
  if not key or not eq:
    raise SystemExit(f'--set {text!r}: expected key=value')
  return text


def expand(sweeps, seeds):
  """[(cell name, {key: value}, seed)] over the grid of sweeps x seeds, in a stable order."""
  keys = [k for k, _ in sweeps]
  runs = []
  for values in itertools.product(*[v for _, v in sweeps]):
    cell = dict(zip(keys, values))
    name = ','.join(f'{k}={v}' for k, v in cell.items()).replace('/', '|') or 'base'
    runs += [(name, cell, seed) for seed in range(seeds)]
  return runs


def command(config, cell, seed, sets, workdir):
  overrides = {**dict(s.split('=', 1) for s in sets), **cell, 'seed': str(seed)}
  default = {k for k, v in cell.items() if v == ''}  # A sweep's empty value: the key's default.
  # Only {seed} is filled in: other braces (data.prompt_template's {prompt}) stay as written.
  args = [f'--config.{k}={v.replace("{seed}", str(seed))}' for k, v in overrides.items()
          if k not in default]
  return [sys.executable, '-m', 'jaxft.train', f'--config={config}', f'--workdir={workdir}', *args]


def git_commit():
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def data_fingerprint(workdir):
  """sha256 of the run's train/val/test records, so runs can be checked to share their data."""
  import ml_collections
  from jaxft import data
  with open(os.path.join(workdir, 'config.json')) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  splits = data.load_splits(cfg.data)
  digest = hashlib.sha256()
  for split in ('train', 'val', 'test'):
    for rec, _ in splits[split]:
      digest.update(json.dumps(rec, sort_keys=True).encode())
  return digest.hexdigest()[:16]


def parsed(argv):
  """The config jaxft.train makes of a run's arguments (its command after the module), read as
  the run reads them: from the repository root."""
  from jaxft import config as config_lib
  argv = [f'--config={os.path.join(ROOT, a[9:])}' if a.startswith('--config=') else a for a in argv]
  return config_lib.parse_args(argv)[0]


def check_finished(workdir, argv):
  """A finished run is reused only if it ran the config these settings give now (apart from
  config.PROCESS_ONLY, the process's settings: those never change a result)."""
  from jaxft import config as config_lib
  with open(os.path.join(workdir, 'config.json')) as f:
    diffs = [d for d in config_lib.differences(json.load(f), parsed(argv))
             if d[0] not in config_lib.PROCESS_ONLY]
  if diffs:
    raise RuntimeError(f'{workdir} holds a finished run of other settings (' + '; '.join(
        f'{k}: {a!r} there, {b!r} now' for k, a, b in diffs) + '): give another --out, or '
        'remove that run to redo it')


def run_one(config, name, cell, seed, sets, out, eval_as):
  """Train (or resume, or skip) one run; returns its directory."""
  workdir = os.path.join(out, name, f'seed_{seed}')
  argv = command(config, cell, seed, sets, workdir)
  if os.path.isfile(os.path.join(workdir, 'summary.json')):
    check_finished(workdir, argv[3:])
  else:
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, 'train.log')
    with open(log_path, 'a') as log:
      done = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
      raise RuntimeError(f'{workdir}: training failed (exit {done.returncode}), see {log_path}')
    if not os.path.isfile(os.path.join(workdir, 'summary.json')):  # Saved and stopped early.
      raise RuntimeError(f'{workdir}: training stopped before its last step (SIGTERM or Ctrl-C), '
                         f'see {log_path}; rerun the same command to resume')
  if os.path.isfile(os.path.join(workdir, 'run.json')):
    with open(os.path.join(workdir, 'run.json')) as f:
      if f'as_{eval_as}' in json.load(f):  # Else scored as another objective now: redo the record.
        return workdir
  extra = {}
  if eval_as:  # Judge the final checkpoint by another objective's metrics too.
    for split in ('val', 'test'):
      done = subprocess.run([sys.executable, '-m', 'jaxft.evaluate', f'--workdir={workdir}',
                             f'--split={split}', f'--objective={eval_as}'], cwd=ROOT,
                            capture_output=True, text=True)
      if done.returncode:
        raise RuntimeError(f'{workdir}: evaluate --split={split} --objective={eval_as} failed '
                           f'(exit {done.returncode}): {done.stderr.strip()[-2000:]}')
      extra[split] = report.latest_eval(workdir, f'{split}_as_{eval_as}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  record = {'cell': name, 'overrides': {**cell, 'seed': seed}, 'sets': sets, 'config': config,
            'git_commit': git_commit(), 'data_fingerprint': data_fingerprint(workdir),
            'final': {s: summary[s] for s in ('val', 'test')}, f'as_{eval_as}': extra or None}
  with open(os.path.join(workdir, 'run.json'), 'w') as f:
    json.dump(record, f, indent=1)
  return workdir


def main(argv):
  parser = argparse.ArgumentParser(prog='python -m experiments.ablate')
  parser.add_argument('--config', required=True)
  parser.add_argument('--sweep', action='append', default=[], type=parse_sweep)
  parser.add_argument('--set', action='append', default=[], dest='sets', type=parse_set,
                      help='key=value applied to every run (key= for an empty string)')
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--out', required=True)
  parser.add_argument('--jobs', type=int, default=1, help='runs at once')
  parser.add_argument('--eval-as', help='also score each run as this objective (e.g. labeled_pair)')
  args = parser.parse_args(argv)
  runs = expand(args.sweep, args.seeds)
  for name, cell, seed in runs:  # Each run's settings, before any run starts: a key that does
    # not exist or a bad value is named here, not in a train.log after the first runs.
    try:
      parsed(command(args.config, cell, seed, args.sets, os.path.join(args.out, name))[3:])
    except (ValueError, OSError) as e:  # (config.ConfigError is a ValueError.)
      raise RuntimeError(f'{name}: {e}') from None
  print(f'{len(runs)} runs ({len(runs) // args.seeds} cells x {args.seeds} seeds) -> {args.out}',
        flush=True)
  pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
  try:
    futures = [pool.submit(run_one, args.config, name, cell, seed, args.sets, args.out,
                           args.eval_as) for name, cell, seed in runs]
    for fut in concurrent.futures.as_completed(futures):
      print(f'done {os.path.relpath(fut.result(), args.out)}', flush=True)
  except KeyboardInterrupt:
    # The runs in progress got the Ctrl-C too (one process group): each saves and exits. The
    # queued ones are not started.
    pool.shutdown(cancel_futures=True)
    sys.exit('interrupted: the runs in progress saved a checkpoint; rerun the same command to '
             'resume the sweep')
  finally:
    pool.shutdown()
  print(report.write(args.out, [k for k, _ in args.sweep]))


if __name__ == '__main__':
  try:
    main(sys.argv[1:])
  except RuntimeError as e:  # A run that failed or does not fit --out: one line, not a traceback.
    sys.exit(f'error: {e}')
