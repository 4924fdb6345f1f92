"""Fault injection on the small demo config: kills, signals, storage failures and NaN batches.
Each test is a row of the README's "Faults and bad input" table."""
import collections
import errno
import glob
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import SMALL, cli_error, small_argv, snapshot
from experiments import kill_resume
from jaxft import cli, data, train


def ckpt_steps(workdir):
  return ocp.utils.checkpoint_steps(os.path.join(workdir, 'checkpoints'))


params = kill_resume.read_params


def assert_same(a, b):
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigkill_at_random_steps_and_during_saves_resumes_bitwise(tmp_path):
  """5 SIGKILLs (the study script runs 20+): at random steps and in the middle of async checkpoint
  writes; each resume takes the newest complete checkpoint, the end equals an uninterrupted run."""
  sets = [f'{k}={v}' for k, v in SMALL.items()] + [
      'train.steps=40', 'checkpoint.every=4', 'train.eval_every=1000']
  report = kill_resume.run(5, str(tmp_path / 'kr'), sets=sets, seed=1)
  assert report['identical'] and report['params_compared'] == 28 and report['losses_identical']
  kills = report['kills']
  assert [k['kind'] for k in kills] == ['step', 'save', 'step', 'save', 'step']
  # A mid-save kill leaves the unfinished step's tmp dir; the resume ignores it and cleans it up.
  assert report['mid_save_kills'] >= 1
  for k in kills:
    assert all(t > k['newest_complete'] for t in k['unfinished_tmp'])
  assert not [n for n in os.listdir(tmp_path / 'kr' / 'killed' / 'checkpoints') if 'tmp' in n]


def test_sigterm_saves_exits_cleanly_and_the_rerun_resumes(tmp_path, root):
  wd = str(tmp_path / 'term')
  cmd = [sys.executable, '-m', 'jaxft.train']
  proc = subprocess.Popen([*cmd, *small_argv(wd, train__steps=100000, checkpoint__every=1000)],
                          cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  path = os.path.join(wd, 'metrics.jsonl')
  deadline = time.time() + 300
  while not (os.path.exists(path) and len(open(path).readlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  [step] = ckpt_steps(wd)
  assert 3 <= step < 1000 and f'SIGTERM: saved step {step}, exiting' in out
  # No orbax warning: of a keep_best save without metrics, or of jaxft's array handler.
  assert 'did not provide metrics' not in out and 'overriding' not in out, out
  rerun = subprocess.run([*cmd, *small_argv(wd, train__steps=step + 2)], cwd=root,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f'resumed from {wd}/checkpoints/{step}' in rerun.stdout
  assert max(ckpt_steps(wd)) == step + 2
  # A notice during set-up (here a Ctrl-C just after the restore) is kept for the first step, and
  # "saved" means on disk: a SIGKILL the moment that line appears leaves the checkpoint whole.
  proc = subprocess.Popen([*cmd, *small_argv(wd, train__steps=100000, checkpoint__every=1000)],
                          cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if 'resumed from' in line:
      proc.send_signal(signal.SIGINT)
    if 'Ctrl-C: saved step' in line:
      proc.kill()
      break
  else:
    pytest.fail('the run ended without saving')
  proc.wait(timeout=60)
  saved = int(re.search(r'saved step (\d+)', line).group(1))
  assert saved == step + 3 and saved in ckpt_steps(wd)
  assert not glob.glob(os.path.join(wd, 'checkpoints', '*tmp*'))


def test_a_second_ctrl_c_interrupts_and_the_handlers_are_restored(monkeypatch, capsys):
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with train.Preemption() as preempted:
    assert not preempted(1)
    os.kill(os.getpid(), signal.SIGINT)  # The first: a checkpoint at the next step, then exit.
    assert preempted(2) and preempted.what == 'Ctrl-C'
    os.kill(os.getpid(), signal.SIGTERM)  # Still the Ctrl-C's stop (and no interrupt).
    assert preempted.what == 'Ctrl-C'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  # The command line turns it into one line and status 130, skipping the interpreter's shutdown.
  def interrupted(argv):
    raise KeyboardInterrupt
  monkeypatch.setattr(cli.os, '_exit', lambda code: pytest.fail(f'exit {code}', pytrace=False))
  with pytest.raises(pytest.fail.Exception, match='^exit 130$'):
    cli.run(interrupted)
  assert capsys.readouterr().err == 'interrupted (Ctrl-C)\n'


def test_a_closed_output_pipe_is_one_line_not_a_traceback(monkeypatch):
  """`python -m jaxft.generate --prompts-file p.jsonl | head`: the reader gone, the command ends
  in one error line, and the flush of stdout at the interpreter's exit finds /dev/null, not the
  closed pipe (which printed "Exception ignored ... BrokenPipeError" after the traceback)."""
  read, write = os.pipe()
  os.close(read)
  out = open(write, 'w')
  monkeypatch.setattr(sys, 'stdout', out)

  def chatty(argv):
    for _ in range(10_000):
      print('x' * 100)
  with pytest.raises(SystemExit, match='^error: the output pipe was closed before everything '
                     'was written$'):
    cli.run(chatty)
  out.write('the rest\n')
  out.close()  # (Flushes: the write that failed at exit.)


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file(code, tmp_path):
  """Writing an output on a full disk (or a read-only one) is the machine's state, not a bug: one
  error line with the file, not a traceback; other OSErrors stay tracebacks."""
  def writes(argv):
    raise OSError(code, os.strerror(code), str(tmp_path / 'out.jsonl'))
  with pytest.raises(SystemExit, match=rf"^error: \[Errno {code}\] {os.strerror(code)}: "
                     rf"'{tmp_path}/out\.jsonl'$"):
    cli.run(writes)
  def bug(argv):
    raise OSError(errno.EBADF, 'Bad file descriptor')
  with pytest.raises(OSError, match='Bad file descriptor'):
    cli.run(bug)


def test_a_damaged_newest_checkpoint_names_the_step_to_resume_from(tmp_path, monkeypatch):
  wd = str(tmp_path / 'run')
  opts = dict(checkpoint__every=2, checkpoint__keep=2, checkpoint__keep_best=False)
  train.main(small_argv(wd, train__steps=4, **opts))
  metadata = os.path.join(wd, 'checkpoints', '4', 'params', '_METADATA')
  assert os.path.isfile(metadata)
  os.remove(metadata)  # A file lost, e.g. by a sync of the workdir cut short.
  before = snapshot(wd)
  message = cli_error(small_argv(wd, train__steps=6, **opts), monkeypatch)
  assert re.search(r'checkpoint 4 may be damaged \(a file lost or cut\): move '
                   rf'{re.escape(wd)}/checkpoints/4 aside to resume from step 2', message), message
  assert snapshot(wd) == before  # Nothing deleted, not even the damaged one.
  shutil.copy(os.path.join(wd, 'checkpoints', '2', 'params', '_METADATA'), metadata)
  data_state = os.path.join(wd, 'checkpoints', '4', 'data', 'metadata')  # The data position.
  open(data_state, 'w').write('{"iterator": ')  # Cut short.
  message = cli_error(small_argv(wd, train__steps=6, **opts), monkeypatch)
  assert re.search(r'checkpoint .*/checkpoints/4: its data state is unreadable: JSONDecodeError: '
                   r'.*\nIf the config is the run\'s own, checkpoint 4 may be damaged \(a file lost '
                   rf'or cut\): move {re.escape(wd)}/checkpoints/4 aside to resume from step 2',
                   message), message
  shutil.move(os.path.join(wd, 'checkpoints', '4'), str(tmp_path / 'aside'))
  train.main(small_argv(wd, train__steps=6, **opts))
  assert sorted(ckpt_steps(wd)) == [4, 6]


def test_unwritable_workdir_fails_before_training(tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  message = cli_error(small_argv(str(blocker / 'run')), monkeypatch)
  assert message.startswith(f'error: workdir {blocker}/run is not writable: ') and \
      '\n' not in message, message
  assert blocker.read_text() == 'not a directory'


def test_full_disk_fails_before_training_and_keeps_the_workdir(tmp_path, monkeypatch):
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, train__steps=2))
  before = snapshot(wd)
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: types.SimpleNamespace(free=100_000))
  message = cli_error(small_argv(wd, train__steps=4), monkeypatch)
  assert re.search(rf'workdir {wd} has 0.1 MiB free, less than one checkpoint \(0.\d MiB of '
                   r'params and optimizer state\)', message), message
  assert snapshot(wd) == before


def test_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, root):
  """A write that fails mid-checkpoint (a file size limit makes the disk 'full' for big files):
  one clear error naming the step, the previous checkpoint intact, and the rerun resumes it."""
  wd = str(tmp_path / 'run')
  opts = dict(checkpoint__every=4, checkpoint__keep=1, train__eval_every=1000)
  train.main(small_argv(wd, train__steps=4, **opts))
  good = params(wd, 4)

  cmd = [sys.executable, '-m', 'jaxft.train', *small_argv(wd, train__steps=8, **opts)]
  # Files past 47 KiB cannot be written (EFBIG, SIGXFSZ ignored): the checkpoint's data files fail.
  full_disk = ['bash', '-c', "trap '' XFSZ; ulimit -f 47; exec \"$@\"", '--']
  failed = subprocess.run(full_disk + cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert failed.returncode == 1
  # orbax's writer threads log their own tracebacks around the message (even on its line, before
  # its newline): find it among them.
  message = re.search(r'error: writing checkpoint .*?resume from it', failed.stderr).group(0)
  assert message.startswith(f'error: writing checkpoint 8 in {wd}/checkpoints failed (') and \
      'File too large' in message and message.endswith(
          'newest complete checkpoint: 4 (intact). Free space / fix the workdir, then rerun to '
          'resume from it'), message
  summary = os.path.join(wd, 'summary.json')  # The first run's: the failed one never finished.
  assert ckpt_steps(wd) == [4] and json.load(open(summary))['steps'] == 4
  assert_same(good, params(wd, 4))
  rerun = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f'resumed from {wd}/checkpoints/4' in rerun.stdout and ckpt_steps(wd) == [8]
  assert json.load(open(summary))['steps'] == 8


def poison(monkeypatch, *batch_indices):
  """Make the train stream's batches at these indices carry NaN in their loss mask."""
  real = data.TrainStream.__next__

  def poisoned(stream):
    index, batch = stream.batches, real(stream)
    return {**batch, 'loss_mask': batch['loss_mask'] * np.nan} if index in batch_indices else batch
  monkeypatch.setattr(data.TrainStream, '__next__', poisoned)


def test_nan_batch_stops_naming_step_and_batch_before_any_save(tmp_path, monkeypatch):
  wd = str(tmp_path / 'nan')
  poison(monkeypatch, 5)  # Batch 5 feeds step 6.
  message = cli_error(small_argv(wd, train__steps=10, checkpoint__every=1, checkpoint__keep=20),
                      monkeypatch)  # One error line: a diverging run is not a bug of jaxft's.
  assert re.match(r'error: non-finite loss nan / grad_norm nan at step 6 \(batch 5 of the train '
                  r'stream\); stopping without saving this state \(optim.skip_nonfinite=N skips',
                  message), message
  assert max(ckpt_steps(wd)) == 5


def test_nan_batch_is_skipped_and_counted_when_allowed(tmp_path, monkeypatch, capsys):
  wd = str(tmp_path / 'skip')
  poison(monkeypatch, 5)
  opts = dict(train__steps=10, checkpoint__every=1, checkpoint__keep=20,
              checkpoint__keep_best=False, optim__skip_nonfinite=1)
  train.main(small_argv(wd, **opts))
  assert 'at step 6 (batch 5 of the train stream): update skipped (1 in a row, 1 in all)' in \
      capsys.readouterr().out
  assert_same(params(wd, 5), params(wd, 6))  # The skipped step changed nothing ...
  assert not np.array_equal(params(wd, 6)['wte/value'], params(wd, 7)['wte/value'])  # ... later ones do.
  lines = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  trains = {l['step']: l for l in lines if l['split'] == 'train'}
  assert trains[6]['loss'] is None and trains[5]['skipped_steps'] == 0
  assert trains[10]['skipped_steps'] == 1 and np.isfinite(trains[10]['loss'])
  # Nor did it advance the lr schedule (optax keeps a skipped step's state): the lr logged is the
  # one applied, step 7's that step 6 would have had.
  assert trains[5]['lr'] != trains[6]['lr'] == trains[7]['lr'] != trains[8]['lr']
  # Two bad batches in a row with only one allowed: the second stops the run before its save.
  wd2 = str(tmp_path / 'two')
  poison(monkeypatch, 5, 6)
  with pytest.raises(FloatingPointError, match=r'at step 7 .*\(2 in a row > optim.skip_nonfinite=1\)'):
    train.main(small_argv(wd2, **opts))
  assert max(ckpt_steps(wd2)) == 6


def test_a_summary_or_config_cut_short_is_evaluated_again_or_named(tmp_path, monkeypatch):
  """summary.json cut short (a kill mid-write): the run is not finished, its final evaluation is
  rewritten; config.json cut short: one error naming it, the workdir left as it was."""
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, train__steps=4))
  summary, config = os.path.join(wd, 'summary.json'), os.path.join(wd, 'config.json')
  whole = json.load(open(summary))
  open(summary, 'w').write(json.dumps(whole)[:40])
  train.main(small_argv(wd, train__steps=4))
  assert json.load(open(summary))['val'] == whole['val'] and not glob.glob(f'{wd}/.*tmp*')
  open(config, 'w').write(open(config).read()[:40])
  before = snapshot(wd)
  message = cli_error(small_argv(wd, train__steps=6), monkeypatch)
  assert message.startswith(f'error: {wd}/config.json is unreadable (Expecting ') and \
      'put it back, or remove it to resume without comparing the configs' in message, message
  assert snapshot(wd) == before


def test_a_rerun_of_the_final_evaluation_logs_it_once(tmp_path):
  """Killed between the final evaluation and summary.json: the rerun evaluates again, and
  metrics.jsonl holds that step's val and test lines once."""
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, train__steps=6))  # (Evaluated at step 5, then at the end.)
  path = os.path.join(wd, 'metrics.jsonl')
  first = [json.loads(l) for l in open(path)]
  os.remove(os.path.join(wd, 'summary.json'))
  train.main(small_argv(wd, train__steps=6))
  lines = [json.loads(l) for l in open(path)]
  assert [(l['step'], l['split']) for l in lines if l['split'] != 'train'] == \
      [(5, 'val'), (6, 'val'), (6, 'test')]
  assert [l for l in lines if l['split'] == 'train'] == [l for l in first if l['split'] == 'train']
  assert [l['loss'] for l in lines if l['step'] == 6 and l['split'] != 'train'] == \
      [l['loss'] for l in first if l['step'] == 6 and l['split'] != 'train']
  # TensorBoard too: each loss once per step, the final train loss kept.
  losses = tb_scalars(os.path.join(wd, 'tb'))
  assert [s for s, _ in losses['val/loss']] == [5, 6] and [s for s, _ in losses['test/loss']] == [6]
  assert [s for s, _ in losses['train/loss']] == [l['step'] for l in first if l['split'] == 'train']
  assert losses['train/loss'][-1][1] == pytest.approx(
      [l for l in lines if l['split'] == 'train'][-1]['loss'])


def tb_scalars(logdir):
  """{tag: [(step, value), ...]} as TensorBoard reads logdir's event files, oldest first: a
  file's purge step (its SessionLog START) drops the earlier files' events from that step on."""
  from tensorboardX.proto import event_pb2
  seen = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*')),
                     key=os.path.getmtime):
    data, i = open(path, 'rb').read(), 0
    while i < len(data):  # TFRecords: length (8 bytes), its CRC (4), the event, its CRC (4).
      n, = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        seen = [s for s in seen if s[1] < event.step]
      seen += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  out = collections.defaultdict(list)
  for tag, step, value in seen:
    out[tag].append((step, value))
  return out


def test_a_checkpoint_without_its_data_item_says_to_init_from_it(tmp_path, monkeypatch):
  """Params alone (convert from-hf's, or a data/ item lost) cannot be resumed: one error naming
  the checkpoint and train.init_from, whose run in a new workdir starts from those params."""
  wd = str(tmp_path / 'run')
  opts = dict(checkpoint__every=2, checkpoint__keep_best=False)
  train.main(small_argv(wd, train__steps=4, **opts))
  shutil.rmtree(os.path.join(wd, 'checkpoints', '4', 'data'))
  before = snapshot(wd)
  message = cli_error(small_argv(wd, train__steps=6, **opts), monkeypatch)
  step_dir = f'{wd}/checkpoints/4'
  assert message.startswith(f'error: checkpoint {step_dir} has no data item (the train '
                            f'position), so it cannot be resumed') and \
      f'use a new --workdir with --config.train.init_from={step_dir}\n' in message and \
      message.endswith(f'move {step_dir} aside to resume from step 2'), message
  assert snapshot(wd) == before
  new = str(tmp_path / 'new')
  train.main(small_argv(new, train__steps=2, train__init_from=step_dir, **opts))
  assert ckpt_steps(new) == [2]
