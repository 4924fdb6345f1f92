"""Fault study: SIGKILL a training run again and again, resume it each time, and check that it
ends bit for bit where an uninterrupted run of the same command ends.

    python -m experiments.kill_resume --kills 20 --out runs/kill_resume \
        [--config=configs/demo.py] [--set train.steps=120] [--set checkpoint.every=5] [--seed 0]

Kills alternate between two moments: a random training step (the newest checkpoint is then
behind) and the middle of a checkpoint write (an orbax `<step>.orbax-checkpoint-tmp` directory is
on disk when the process dies). Each resume must pick up the newest complete checkpoint; at the
end the final params and every step's train loss must equal the uninterrupted run's exactly.
Dropout is on (model.dropout=0.1 unless --set), so the RNG has to be restored too, not just the
params, optimizer and data position. Writes <out>/kill_resume.json and exits 1 on a mismatch.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = '.orbax-checkpoint-tmp'


class Run:
  """One `python -m jaxft.train` process whose stdout lines are collected by a thread."""

  def __init__(self, config, sets, workdir):
    cmd = [sys.executable, '-m', 'jaxft.train', f'--config={config}', f'--workdir={workdir}',
           *[f'--config.{s}' for s in sets]]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    self.lines = []
    self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
    self.reader.start()

  def last_step(self):
    """The newest 'step N/M ...' progress line printed so far (0 if none)."""
    steps = [int(m.group(1)) for l in list(self.lines) if (m := re.match(r'step (\d+)/', l))]
    return max(steps, default=0)

  def finish(self, timeout=900):
    self.proc.wait(timeout=timeout)
    self.reader.join()
    return self.proc.returncode, ''.join(self.lines)


def checkpoints(workdir):
  """(complete checkpoint steps, steps with an unfinished tmp dir) on disk."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return [], []
  tmp = sorted(int(n.split('.')[0]) for n in os.listdir(d) if n.endswith(TMP))
  return sorted(ocp.utils.checkpoint_steps(d)), tmp


def kill_once(config, sets, workdir, kind, target, timeout=600):
  """Start a run and SIGKILL it once step >= target is printed ('step'), or at the first
  checkpoint write under way from then on ('save'). Returns what was on disk afterwards."""
  before, _ = checkpoints(workdir)
  run = Run(config, sets, workdir)
  deadline = time.time() + timeout
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  while True:
    if run.proc.poll() is not None:
      code, out = run.finish()
      raise RuntimeError(f'run ended (exit {code}) before the {kind} kill at {target}:\n{out}')
    if time.time() > deadline:
      run.proc.kill()
      raise TimeoutError(f'no {kind} kill point reached within {timeout}s')
    reached = run.last_step() >= target  # Also means the manager has cleaned up stale tmp dirs.
    if reached and (kind == 'step' or any(n.endswith(TMP) for n in os.listdir(ckpt_dir))):
      break
    time.sleep(0.0005 if reached else 0.01)  # A small model's write is under way for milliseconds.
  run.proc.send_signal(signal.SIGKILL)
  run.finish()
  done, tmp = checkpoints(workdir)
  return {'kind': kind, 'resumed_from': max(before, default=0), 'killed_after_step':
          run.last_step(), 'newest_complete': max(done, default=0), 'unfinished_tmp': tmp}


def read_params(workdir, step=None):
  """{'h/0/attn/c_attn_kernel/value': array, ...} of a checkpoint (default: the newest complete)."""
  step = max(checkpoints(workdir)[0]) if step is None else step
  path = os.path.join(workdir, 'checkpoints', str(step), 'params')
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  # As numpy on the host: readable whatever devices (or processes) wrote it.
  tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return {'/'.join(str(k.key) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(l['step'], l['loss']) for l in map(json.loads, f) if l['split'] == 'train']


def run(kills, out, config='configs/demo.py', sets=(), seed=0):
  """The study; returns (and writes) its report."""
  sets = ['model.dropout=0.1', 'train.steps=120', 'checkpoint.every=5', 'checkpoint.keep=2',
          'train.log_every=1', *sets]
  steps = int([s for s in sets if s.startswith('train.steps=')][-1].split('=')[1])
  shutil.rmtree(out, ignore_errors=True)
  ref_dir, killed_dir = os.path.join(out, 'uninterrupted'), os.path.join(out, 'killed')
  reference = Run(config, sets, ref_dir)  # Runs alongside the kills.
  if kills >= steps:
    raise ValueError(f'{kills} kills need more than {steps} train.steps')
  # Kill points spread over the whole run, in order; each is reached again after the resume.
  targets = np.sort(np.random.default_rng(seed).choice(np.arange(1, steps), kills, replace=False))
  records = []
  for i, target in enumerate(targets):
    kind = ('step', 'save')[i % 2]
    records.append({'target': int(target),
                    **kill_once(config, sets, killed_dir, kind, int(target))})
    print(f'kill {i + 1}/{kills}: {records[-1]}', flush=True)
  final = Run(config, sets, killed_dir)
  code, text = final.finish()
  if code:
    raise RuntimeError(f'the final resume failed (exit {code}):\n{text}')
  code, text = reference.finish()
  if code:
    raise RuntimeError(f'the uninterrupted run failed (exit {code}):\n{text}')
  a, b = read_params(ref_dir), read_params(killed_dir)
  differing = sorted(k for k in a if k not in b or not np.array_equal(a[k], b[k]))
  report = {
      'kills': records, 'steps': steps, 'sets': sets,
      'mid_save_kills': sum(bool(r['unfinished_tmp']) for r in records),
      'params_compared': len(a), 'params_differing': differing,
      'losses_identical': train_losses(ref_dir) == train_losses(killed_dir),
  }
  report['identical'] = not differing and report['losses_identical'] and a.keys() == b.keys()
  with open(os.path.join(out, 'kill_resume.json'), 'w') as f:
    json.dump(report, f, indent=1)
  print(f"{kills} kills ({report['mid_save_kills']} during a checkpoint write): final params "
        f"{'identical' if not differing else 'DIFFER: ' + ', '.join(differing)} "
        f"({len(a)} arrays), per-step train losses "
        f"{'identical' if report['losses_identical'] else 'DIFFER'}", flush=True)
  return report


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--kills', type=int, default=20)
  p.add_argument('--out', default='runs/kill_resume')
  p.add_argument('--config', default='configs/demo.py')
  p.add_argument('--set', action='append', default=[], help='config override key=value')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  report = run(args.kills, args.out, args.config, args.set, args.seed)
  sys.exit(0 if report['identical'] else 1)


if __name__ == '__main__':
  main()
