"""Multi-host on one machine: 2 processes x 4 fake CPU devices joined by jax.distributed (gloo)
against 1 process x 8 devices: same losses and params, checkpoints that move between process
counts and meshes, a preemption notice on one process stopping both at the same step, files from
process 0 only and errors from every process."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, cli_error, small_argv, xla_flags
from experiments.kill_resume import read_params
from jaxft import train

CHECKPOINTED = dict(train__steps=6, checkpoint__every=3, train__eval_every=3,
                    train__eval_batches=1)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, processes=2, signal_at=None, **overrides):
  """`python -m jaxft.train` as `processes` processes of 4 CPU devices each: [(exit code, output)].
  signal_at=N: SIGTERM process 1 (only) once process 0 has logged step N."""
  env = {**os.environ, 'XLA_FLAGS': xla_flags(4)}
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'jaxft.train', *small_argv(workdir, **overrides),
       '--config.distributed.enabled=True',
       f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       f'--config.distributed.num_processes={processes}', f'--config.distributed.process_id={i}',
       '--config.distributed.timeout_s=60'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(processes)]
  if signal_at:
    log = []
    for line in procs[0].stdout:  # Read process 0's output as it comes.
      log.append(line)
      if line.startswith(f'step {signal_at}/'):
        procs[1].send_signal(signal.SIGTERM)
        break
    outs = [''.join(log) + procs[0].communicate(timeout=300)[0], procs[1].communicate(timeout=300)[0]]
  else:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  return [(p.returncode, out) for p, out in zip(procs, outs)]


def losses(workdir, split='train'):
  return {l['step']: l['loss'] for l in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
          if l['split'] == split}


def assert_close(a, b, tol):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=str(k))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The same 6 steps by 2 processes and by 1 (in this process, 8 devices)."""
  root = tmp_path_factory.mktemp('multihost')
  two, one = str(root / 'two'), str(root / 'one')
  outputs = launch(two, **CHECKPOINTED)
  train.main(small_argv(one, **CHECKPOINTED))
  return root, two, one, outputs


def test_two_processes_train_like_one(runs):
  _, two, one, outputs = runs
  for code, out in outputs:
    assert code == 0, out[-3000:]
  assert 'mesh {\'data\': 8, \'fsdp\': 1, \'tensor\': 1} over 8 cpu devices, 2 process(es)' in \
      outputs[0][1]
  # Each process says what it waits for (a peer that never joins ends in an abort of jax's).
  for i, (_, out) in enumerate(outputs):
    assert re.search(rf'^jax.distributed: process {i} of 2 joining 127\.0\.0\.1:\d+, waiting up '
                     rf'to distributed\.timeout_s=60 s for all$', out, re.M), out[:2000]
  assert_close(losses(two), losses(one), 1e-5)
  assert list(losses(two)) == [1, 2, 3, 4, 5, 6]  # One metrics line per step: process 0 writes.
  assert_close(losses(two, 'test'), losses(one, 'test'), 1e-5)
  assert_close(read_params(two), read_params(one), 1e-5)
  # Progress lines and files come from process 0 only.
  assert 'step 6/6' in outputs[0][1] and 'step 6/6' not in outputs[1][1]
  assert 'train:' not in outputs[1][1] and 'test:' not in outputs[1][1]


def test_checkpoints_move_between_process_counts_and_meshes(runs):
  root, two, one, _ = runs
  # Reference: the 1-process run carried on to step 9 on its own mesh.
  ref = str(root / 'ref')
  shutil.copytree(one, ref)
  train.main(small_argv(ref, **{**CHECKPOINTED, 'train__steps': 9}))
  # Written by 2 processes, resumed by 1 on an fsdp mesh ...
  to_one = str(root / 'to_one')
  shutil.copytree(two, to_one)
  train.main(small_argv(to_one, **{**CHECKPOINTED, 'train__steps': 9, 'mesh__data': 1,
                                   'mesh__fsdp': 8}))
  # ... and written by 1, resumed by 2 on an fsdp x tensor mesh.
  to_two = str(root / 'to_two')
  shutil.copytree(one, to_two)
  (code0, out0), (code1, out1) = launch(to_two, **{**CHECKPOINTED, 'train__steps': 9,
                                                   'mesh__data': 2, 'mesh__fsdp': 2,
                                                   'mesh__tensor': 2})
  assert code0 == code1 == 0, out0[-3000:] + out1[-3000:]
  assert f'resumed from {to_two}/checkpoints/6' in out0
  for wd in (to_one, to_two):
    assert_close(losses(wd), losses(ref), 1e-4)
    assert_close(read_params(wd), read_params(ref), 1e-4)


def test_preemption_notice_on_one_process_stops_both_at_the_same_step(tmp_path):
  wd = str(tmp_path / 'run')
  long_run = dict(train__steps=100_000, checkpoint__every=1000, train__eval_every=1000)
  (code0, out0), (code1, out1) = launch(wd, signal_at=3, **long_run)
  assert code0 == code1 == 0, out0[-3000:] + out1[-3000:]
  saved = [int(l.split('saved step ')[1].split(',')[0]) for l in out0.splitlines()
           if l.startswith('preemption notice: saved step')]
  assert len(saved) == 1 and saved[0] > 3, out0[-3000:]
  assert os.listdir(os.path.join(wd, 'checkpoints')) == [str(saved[0])]
  # Resumed by 2 processes to a few steps more.
  (code0, out0), (code1, _) = launch(wd, **{**long_run, 'train__steps': saved[0] + 2})
  assert code0 == code1 == 0 and f'resumed from {wd}/checkpoints/{saved[0]}' in out0
  assert max(losses(wd)) == saved[0] + 2


def test_every_process_reports_its_error(tmp_path):
  started = time.time()
  outputs = launch(str(tmp_path / 'run'), data__source='files',
                   data__train=str(tmp_path / 'missing.jsonl'))
  for code, out in outputs:
    assert code == 1 and f"error: no data file matches '{tmp_path}/missing.jsonl'" in out, out
  assert time.time() - started < 120


def test_distributed_settings_that_cannot_work_are_named_by_their_keys(tmp_path, monkeypatch):
  wd = str(tmp_path / 'run')
  argv = lambda **d: small_argv(wd, **{f'distributed__{k}': v for k, v in d.items()})
  # Given without enabled=True they were ignored: every process trained alone, into one workdir.
  assert cli_error(argv(num_processes=2, process_id=1), monkeypatch) == (
      'error: distributed.num_processes=2, distributed.process_id=1 given with '
      'distributed.enabled=False: each process would train alone (into the same workdir); add '
      '--config.distributed.enabled=True (or unset them to run one process)')
  address = dict(enabled=True, coordinator_address=f'127.0.0.1:{free_port()}')
  # jax raised a ValueError naming its own argument (here process 2 of 2: its peers then waited
  # out distributed.timeout_s), or an IndexError for an address without its port.
  assert cli_error(argv(**address, num_processes=2, process_id=2), monkeypatch) == (
      'error: distributed.process_id=2 must be below distributed.num_processes=2 (ids count '
      'from 0)')
  assert cli_error(argv(enabled=True, coordinator_address='node0'), monkeypatch) == (
      "error: distributed.coordinator_address='node0' must be host:port (of process 0)")
  assert cli_error(argv(process_id=-2), monkeypatch) == (
      "error: config key 'distributed.process_id' is -2; it must be >= -1")
  assert not os.path.exists(wd)
  # What jax cannot detect outside TPU VMs / SLURM / Open MPI (a subprocess: jax.distributed
  # is process-wide; the environment is cleared of what a cluster would set).
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR', 'TPU_', 'MEGASCALE_'))}
  run = subprocess.run([sys.executable, '-m', 'jaxft.train', *argv(**address, num_processes=2)],
                       cwd=ROOT, env={**env, 'XLA_FLAGS': xla_flags(4)}, capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == (
      f"error: jax.distributed.initialize (distributed.coordinator_address="
      f"'{address['coordinator_address']}', distributed.num_processes=2): The process id of the "
      f"current process must be defined. Outside TPU VMs, SLURM and Open MPI give "
      f"distributed.coordinator_address=host:port (of process 0), distributed.num_processes and "
      f"distributed.process_id"), run.stderr[-2000:]
