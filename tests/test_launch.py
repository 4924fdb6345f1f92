"""launch_tpu.sh against a fake `gcloud` on PATH that records its arguments (one JSON list per
call): the commands of a single-host v4-8 launch and of a queued multi-host v4-32 spot launch."""
import json
import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch_tpu.sh')
TRAIN = ['--config=configs/demo.py', '--config.data.train=gs://b/d/*.jsonl', '--workdir=gs://b/runs/x']


@pytest.fixture
def fake_gcloud(tmp_path):
  """PATH with a `gcloud` that appends its argv to calls.jsonl (and says ACTIVE when asked)."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'calls.jsonl'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(
      '#!/usr/bin/env python3\nimport json, sys\n'
      f'open({str(log)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
      'if "describe" in sys.argv: print("ACTIVE")\n')
  (bin_dir / 'gcloud').chmod(0o755)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}'}

  def launch(*args):
    run = subprocess.run([SCRIPT, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    calls = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return run, calls
  return launch


def remote(call):
  """The --command of a `tpu-vm ssh` call, split like the remote shell would."""
  return next(a for a in call if a.startswith('--command=')).split('=', 1)[1]


def test_single_host_v4_8(fake_gcloud):
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  run, calls = fake_gcloud('--name', 'tpu1', '--zone', 'us-central2-b', '--repo',
                           'https://example.com/jaxft.git', '--delete', '--', *TRAIN)
  assert run.returncode == 0, run.stderr
  assert calls[0] == ['compute', 'tpus', 'tpu-vm', 'create', 'tpu1', '--zone=us-central2-b',
                      '--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']
  ssh = ['compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1', '--zone=us-central2-b', '--worker=all']
  assert [c[:7] for c in calls[1:4]] == [ssh] * 3
  clone, install, train = (remote(c) for c in calls[1:4])
  assert clone == (f'rm -rf jaxft && git clone -q https://example.com/jaxft.git jaxft && '
                   f'git -C jaxft checkout -q {head} && mkdir -p runs && ln -sfn ../runs jaxft/runs')
  assert install.endswith("pip install -q -e '.[tpu]'")
  # The same train command on every worker, its arguments intact through the remote shell.
  cmd = shlex.split(train.split('&& ', 2)[2])
  assert cmd == ['python', '-m', 'jaxft.train', '--config.distributed.enabled=True', *TRAIN]
  assert calls[4] == ['compute', 'tpus', 'tpu-vm', 'delete', 'tpu1', '--zone=us-central2-b',
                      '--quiet']
  assert len(calls) == 5


def test_multi_host_v4_32_queued_spot_scp(fake_gcloud):
  run, calls = fake_gcloud('--name', 'pod', '--zone', 'us-central2-b', '--accelerator', 'v4-32',
                           '--project', 'proj', '--spot', '--queued', '--ship', 'scp', '--', *TRAIN)
  assert run.returncode == 0, run.stderr
  common = ['--zone=us-central2-b', '--project=proj']
  assert calls[0] == ['compute', 'tpus', 'queued-resources', 'create', 'pod', '--node-id=pod',
                      *common, '--accelerator-type=v4-32', '--runtime-version=tpu-ubuntu2204-base',
                      '--spot']
  assert calls[1][:5] == ['compute', 'tpus', 'queued-resources', 'describe', 'pod']
  assert calls[2][:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and calls[2][5:] == [
      'pod:jaxft.tar.gz', *common, '--worker=all']
  assert all(c[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and '--worker=all' in c
             for c in calls[3:])
  # The runs (default workdirs) outlive the re-shipped code: a --skip-create rerun resumes.
  assert remote(calls[3]).endswith('tar -xzf jaxft.tar.gz -C jaxft && mkdir -p runs && '
                                   'ln -sfn ../runs jaxft/runs')
  assert 'jaxft.train --config.distributed.enabled=True' in remote(calls[5]) and len(calls) == 6


def test_dry_run_prints_every_command_and_runs_none(fake_gcloud):
  run, calls = fake_gcloud('--name', 'pod', '--zone', 'z', '--accelerator', 'v4-32', '--queued',
                           '--repo', 'r', '--ref', 'main', '--delete', '--dry-run', '--', *TRAIN)
  assert run.returncode == 0, run.stderr
  assert calls == [] and '# (repeated every 30 s until it prints ACTIVE)' in run.stdout
  printed = [shlex.split(l)[1:] for l in run.stdout.splitlines() if l.startswith('gcloud ')]
  assert [p[:4] for p in printed] == [['compute', 'tpus', 'queued-resources', 'create'],
                                     ['compute', 'tpus', 'queued-resources', 'describe']] + \
      [['compute', 'tpus', 'tpu-vm', 'ssh']] * 3 + [['compute', 'tpus', 'queued-resources', 'delete']]


def test_help_documents_every_option_and_bad_use_is_named(fake_gcloud):
  run, _ = fake_gcloud('--help')
  options = set(re.findall(r'^    (--[a-z-]+)\)', open(SCRIPT).read(), re.M))
  assert len(options) == 13 and run.returncode == 0
  assert all(re.search(rf'^  {o}\b', run.stdout, re.M) for o in options), run.stdout
  run, calls = fake_gcloud('--name', 'x', '--zone', 'z', '--acclerator', 'v4-8', '--', *TRAIN)
  assert run.returncode == 2 and 'unknown option --acclerator' in run.stderr and calls == []
  run, calls = fake_gcloud('--name', 'x', '--', *TRAIN)
  assert run.returncode == 2 and '--name and --zone are required' in run.stderr and calls == []
  run, calls = fake_gcloud('--zone', 'z', '--name')
  assert run.returncode == 2 and 'launch_tpu.sh: --name needs a value' in run.stderr and calls == []
