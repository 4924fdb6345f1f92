"""Tables and plots over an ablation's run directories (<out>/<cell>/seed_<n>/run.json).

    python -m experiments.report runs/lr_vs_frozen [--keys=optim.lr,train.trainable]

results.md and results.csv: mean +- std over seeds of every final test metric per cell;
learning_curves.png: train loss per cell, mean over seeds with the min-max band shaded;
final_vs_<key>.png: the cells' main metric (one they all have) against each swept key's value.
"""
import argparse
import csv
import glob
import json
import os

import numpy as np

MAIN_METRIC = {'next_token': 'loss', 'labeled_pair': 'exact_match', 'classification': 'accuracy'}


def latest_eval(workdir, split):
  """Metrics of the newest eval/<split>_<step>.json of a run."""
  paths = glob.glob(os.path.join(workdir, 'eval', f'{split}_*.json'))
  step = lambda p: int(p.rsplit('_', 1)[1].split('.')[0])
  paths = [p for p in paths if p.rsplit('_', 1)[1].split('.')[0].isdigit()]
  with open(max(paths, key=step)) as f:
    return json.load(f)['metrics']


def collect(out):
  """{cell: [(workdir, run record)]} for every finished run under `out`."""
  cells = {}
  for path in sorted(glob.glob(os.path.join(out, '*', 'seed_*', 'run.json'))):
    with open(path) as f:
      record = json.load(f)
    cells.setdefault(record['cell'], []).append((os.path.dirname(path), record))
  return cells


def scalars(record):
  """Final test metrics (and other-objective scores) of a run as {name: float}."""
  out = {k: v for k, v in record['final']['test'].items() if isinstance(v, (int, float))}
  for key, extra in record.items():
    if key.startswith('as_') and extra:
      out.update({f'{k} ({key})': v for k, v in extra['test'].items()
                  if isinstance(v, (int, float))})
  return out


def objective_of(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)['objective']


def summarize(cells):
  """[(cell, n seeds, {metric: (mean, std)})]; std None for one seed (no spread to show)."""
  rows = []
  for cell, runs in cells.items():
    values = [scalars(r) for _, r in runs]
    names = sorted(set.intersection(*[set(v) for v in values]))
    stats = {n: (float(np.mean([v[n] for v in values])),
                 float(np.std([v[n] for v in values], ddof=1)) if len(values) > 1 else None)
             for n in names}
    rows.append((cell, len(runs), stats))
  return rows


def write(out, keys=None):
  """Write results.md, results.csv and the plots for the runs under `out`; returns the table."""
  cells = collect(out)
  if not cells:
    raise SystemExit(f'no finished run (run.json) under {out}')
  rows = summarize(cells)
  metrics = sorted({m for _, _, stats in rows for m in stats if m != 'supervised_tokens'})
  lines = ['| cell | seeds | ' + ' | '.join(metrics) + ' |', '|---|---|' + '---|' * len(metrics)]
  for cell, n, stats in rows:
    cols = ['' if m not in stats else f'{stats[m][0]:.4f}' if stats[m][1] is None else
            f'{stats[m][0]:.4f} ± {stats[m][1]:.4f}' for m in metrics]
    lines.append(f'| {cell} | {n} | ' + ' | '.join(cols) + ' |')
  table = '\n'.join(lines) + '\n'
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['cell', 'seeds'] + [f'{m} {s}' for m in metrics for s in ('mean', 'std')])
    for cell, n, stats in rows:
      w.writerow([cell, n] + ['' if x is None else x for m in metrics
                              for x in (stats.get(m) or ('', ''))])
  plot(out, cells, rows, keys or [])
  return table


def plotted_metric(cells, rows):
  """The one metric final_vs_<key> plots, which every cell has: the cells' objective's main one;
  where their objectives differ, that of the objective --eval-as scored them all as; else (or
  with labeled_pair's exact match skipped, train.exact_match_examples=0) the loss."""
  common = set.intersection(*[set(stats) for _, _, stats in rows])
  own = {objective_of(runs[0][0]) for runs in cells.values()}
  candidates = ([MAIN_METRIC[next(iter(own))]] if len(own) == 1 else []) + \
      [f'{m} (as_{o})' for o, m in MAIN_METRIC.items()] + ['loss']
  metric = next((m for m in candidates if m in common), None)
  if metric is None:
    raise SystemExit(f'no final test metric that every cell has to plot (they share '
                     f'{", ".join(sorted(common)) or "none"})')
  return metric


def plot(out, cells, rows, keys):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for cell, runs in cells.items():
    curves = []
    for workdir, _ in runs:
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        lines = [json.loads(l) for l in f if l.strip()]
      curves.append({l['step']: l['loss'] for l in lines if l['split'] == 'train'})
    steps = sorted(set.intersection(*[set(c) for c in curves]))
    y = np.array([[c[s] for s in steps] for c in curves])
    ax.plot(steps, y.mean(0), label=cell, marker='o' if len(steps) < 3 else None)  # (1 point.)
    ax.fill_between(steps, y.min(0), y.max(0), alpha=0.25)
  ax.set(xlabel='step', ylabel='train loss', yscale='log', title='learning curves (seeds shaded)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'learning_curves.png'), dpi=120)
  plt.close(fig)
  metric = plotted_metric(cells, rows) if keys else None
  for key in keys:
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell, n, stats in rows:
      record = cells[cell][0][1]
      value = str(record['overrides'].get(key, ''))
      mean, std = stats[metric]
      ax.errorbar([value or '(default)'], [mean], yerr=None if std is None else [std], fmt='o',
                  capsize=4, label=cell)
    ax.set(xlabel=key, ylabel=f'final test {metric}', title=f'final {metric} vs {key}')
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f'final_vs_{key.replace("/", "_")}.png'), dpi=120)
    plt.close(fig)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(prog='python -m experiments.report')
  parser.add_argument('out', help='the --out directory of an ablation')
  parser.add_argument('--keys', default='', help='swept keys to plot against, comma-separated')
  args = parser.parse_args()
  print(write(args.out, [k for k in args.keys.split(',') if k]))
