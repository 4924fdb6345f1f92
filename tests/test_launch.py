"""launch_tpu.sh against a fake `gcloud` on PATH that records its arguments (one JSON list per
call): the commands of a single-host v4-8 launch and of a queued multi-host v4-32 spot launch."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch_tpu.sh')
TRAIN = ['--config=configs/demo.py', '--config.data.train=gs://b/d/*.jsonl', '--workdir=gs://b/runs/x']


@pytest.fixture
def fake_gcloud(tmp_path):
  """PATH with a `gcloud` that appends its argv to calls.jsonl (and says ACTIVE when asked)."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'calls.jsonl'
  bin_dir.mkdir()
  # FAKE_STATE: what describe prints; FAKE_FAIL: a call whose arguments hold it fails.
  (bin_dir / 'gcloud').write_text(
      '#!/usr/bin/env python3\nimport json, os, sys\n'
      f'open({str(log)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
      'if "describe" in sys.argv: print(os.environ.get("FAKE_STATE", "ACTIVE"))\n'
      'fail = os.environ.get("FAKE_FAIL")\n'
      'sys.exit(1 if fail and fail in " ".join(sys.argv) else 0)\n')
  (bin_dir / 'gcloud').chmod(0o755)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}'}

  def launch(*args, script=SCRIPT, **fake):
    log.unlink(missing_ok=True)  # The calls of this launch only.
    run = subprocess.run([script, *args], env={**env, **fake}, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
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
  assert clone.endswith(f'; rm -rf jaxft && git clone -q https://example.com/jaxft.git jaxft && '
                        f'git -C jaxft checkout -q {head} && mkdir -p runs && ln -sfn ../runs '
                        f'jaxft/runs')  # (After the check that no detached training runs.)
  assert install.endswith("pip install -q -e '.[tpu]'")
  # The same train command on every worker, its arguments intact through the remote shell.
  cmd = shlex.split(train.split('&& ', 2)[2])
  assert cmd == ['python', '-m', 'jaxft.train', '--config.distributed.enabled=True', *TRAIN]
  assert calls[4] == ['compute', 'tpus', 'tpu-vm', 'delete', 'tpu1', '--zone=us-central2-b',
                      '--quiet']
  assert len(calls) == 5


def test_multi_host_v4_32_queued_spot_scp(fake_gcloud, tmp_path):
  tmp = tmp_path / 'tmp'
  tmp.mkdir()
  run, calls = fake_gcloud('--name', 'pod', '--zone', 'us-central2-b', '--accelerator', 'v4-32',
                           '--project', 'proj', '--spot', '--queued', '--ship', 'scp', '--', *TRAIN,
                           TMPDIR=str(tmp))
  assert run.returncode == 0, run.stderr
  assert calls[2][4].startswith(f'{tmp}/') and not os.listdir(tmp)  # The archive, gone once sent.
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
  assert len(options) == 14 and run.returncode == 0
  assert all(re.search(rf'^  {o}\b', run.stdout, re.M) for o in options), run.stdout
  run, calls = fake_gcloud('--name', 'x', '--zone', 'z', '--acclerator', 'v4-8', '--', *TRAIN)
  assert run.returncode == 2 and 'unknown option --acclerator' in run.stderr and calls == []
  run, calls = fake_gcloud('--name', 'x', '--', *TRAIN)
  assert run.returncode == 2 and '--name and --zone are required' in run.stderr and calls == []
  run, calls = fake_gcloud('--zone', 'z', '--name')
  assert run.returncode == 2 and 'launch_tpu.sh: --name needs a value' in run.stderr and calls == []


def test_a_failure_after_create_still_deletes_the_vm(fake_gcloud):
  """--delete holds when a step fails (set -e used to exit first, leaving the VM up and billed)."""
  delete = ['compute', 'tpus', 'tpu-vm', 'delete', 'tpu1', '--zone=z', '--quiet']
  run, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--delete', '--', *TRAIN,
                           FAKE_FAIL='pip install')
  assert run.returncode == 1 and calls[-1] == delete, run.stderr
  assert not any('-m jaxft.train' in a for c in calls for a in c)  # Stopped at the install.
  run, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--delete', '--', *TRAIN,
                           FAKE_FAIL='-m jaxft.train')
  assert run.returncode == 1 and calls[-1] == delete and len(calls) == 5  # As before.
  # A create that fails deletes nothing: the name may be someone else's VM.
  run, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--delete', '--', *TRAIN,
                           FAKE_FAIL='create')
  assert run.returncode == 1 and [c[3] for c in calls] == ['create']


@pytest.mark.parametrize('state', ['FAILED', 'SUSPENDED'])
def test_a_queued_resource_that_cannot_become_active_stops_the_wait(fake_gcloud, state):
  """It waited (every 30 s) for ACTIVE forever."""
  run, calls = fake_gcloud('--name', 'pod', '--zone', 'z', '--queued', '--repo', 'r', '--delete',
                           '--', *TRAIN, FAKE_STATE=state)
  assert run.returncode == 1 and f'launch_tpu.sh: queued resource pod is {state}' in run.stderr
  assert [c[2:4] for c in calls] == [['queued-resources', 'create'],
                                     ['queued-resources', 'describe'],
                                     ['queued-resources', 'delete']]


def test_the_install_takes_a_python_new_enough_for_jax(fake_gcloud, tmp_path):
  """jax >= 0.7 needs Python 3.11; the TPU runtimes' python3 is Ubuntu 22.04's 3.10, and
  `python3 -m venv` there made a venv in which `pip install -e '.[tpu]'` found no jax."""
  _, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--', *TRAIN)
  install = remote(calls[2])
  assert install.endswith("&& $py -m venv .venv && . .venv/bin/activate && pip install -q -e "
                          "'.[tpu]'")
  pick = install[:install.index(' && $py -m venv')]
  bin_dir, work = tmp_path / 'vm_bin', tmp_path / 'home'
  bin_dir.mkdir()
  (work / 'jaxft').mkdir(parents=True)

  def fake(name, body):
    (bin_dir / name).write_text(f'#!/bin/sh\n{body}\n')
    (bin_dir / name).chmod(0o755)

  def picked():  # The remote shell on a VM whose commands are only the fakes.
    out = subprocess.run(['/bin/bash', '-c', f'{pick} && echo "picked $py"'], cwd=work,
                         env={'PATH': str(bin_dir)}, capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[-1]
  fake('python3', 'exit 1')  # 3.10: fails the version check.
  fake('sudo', f'echo "$*" >> {tmp_path}/sudo.log\ncase "$*" in *install*) '
               f'printf "#!/bin/sh\\nexit 0\\n" > {bin_dir}/python3.11; '
               f'/bin/chmod +x {bin_dir}/python3.11;; esac')
  assert picked() == 'picked python3.11'
  sudo = (tmp_path / 'sudo.log').read_text().splitlines()
  assert [l.split()[-1] for l in sudo] == ['-qq', 'python3.11-venv'] and 'update' in sudo[0]
  fake('python3.12', 'exit 0')  # A new enough one (with venv) is taken as it is.
  assert picked() == 'picked python3.12'
  assert len((tmp_path / 'sudo.log').read_text().splitlines()) == 2  # No more apt-get.


def test_train_arguments_with_spaces_and_quotes_arrive_whole(fake_gcloud, tmp_path):
  template = "--config.data.prompt_template=Q: {prompt} it's\tA: "
  _, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--', template, *TRAIN)
  train = remote(calls[3])
  # Run by a real bash as the worker's shell would, printing each argument python would get.
  argv = subprocess.run(['/bin/bash', '-c', train.split('&& ', 2)[2].replace(
      'python -m jaxft.train', 'printf "%s\\0"', 1)], capture_output=True, text=True).stdout
  assert argv.split('\0')[:-1] == ['--config.distributed.enabled=True', template, *TRAIN]


def test_a_missing_option_value_a_missing_repo_and_unshipped_changes_are_named(fake_gcloud,
                                                                               tmp_path):
  run, calls = fake_gcloud('--name', '--zone', 'z', '--', *TRAIN)  # '--zone' was the name.
  assert run.returncode == 2 and 'launch_tpu.sh: --name needs a value' in run.stderr and not calls
  # A checkout without an origin remote (and no --repo) has nothing to clone.
  repo = tmp_path / 'checkout'
  repo.mkdir()
  shutil.copy(SCRIPT, repo)
  (repo / 'code.py').write_text('x = 1\n')
  for git in (['init', '-q'], ['add', 'code.py'],
              ['-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '-m', 'x']):
    subprocess.run(['git', '-C', str(repo), *git], check=True)
  script = str(repo / 'launch_tpu.sh')
  run, calls = fake_gcloud('--name', 'x', '--zone', 'z', '--', *TRAIN, script=script)
  assert run.returncode == 2 and not calls and ('launch_tpu.sh: --ship git needs --repo (this '
                                                'checkout has no origin remote)') in run.stderr
  # Both ships send HEAD: an edit not committed is not on the workers, and is said so.
  warning = 'launch_tpu.sh: warning: this checkout has uncommitted changes'
  for ship in ('git', 'scp'):
    run, _ = fake_gcloud('--name', 'x', '--zone', 'z', '--repo', 'r', '--ship', ship, '--',
                         *TRAIN, script=script)
    assert run.returncode == 0 and warning not in run.stderr, run.stderr
  (repo / 'code.py').write_text('x = 2\n')
  for ship in ('git', 'scp'):
    run, _ = fake_gcloud('--name', 'x', '--zone', 'z', '--repo', 'r', '--ship', ship, '--',
                         *TRAIN, script=script)
    assert run.returncode == 0 and warning in run.stderr


@pytest.mark.parametrize('accelerator, runtime', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')])
def test_the_default_runtime_is_the_one_for_the_tpu_generation(fake_gcloud, accelerator, runtime):
  """tpu-ubuntu2204-base is for v4 and older only: a v5e / v5p / v6e create was refused."""
  _, calls = fake_gcloud('--name', 'x', '--zone', 'z', '--repo', 'r', '--accelerator', accelerator,
                         '--', *TRAIN)
  assert calls[0][-2:] == [f'--accelerator-type={accelerator}', f'--version={runtime}']
  _, calls = fake_gcloud('--name', 'x', '--zone', 'z', '--repo', 'r', '--accelerator', accelerator,
                         '--version', 'mine', '--', *TRAIN)
  assert calls[0][-1] == '--version=mine'


def test_detach_leaves_the_training_running_and_a_relaunch_waits_for_it(fake_gcloud, tmp_path):
  """Training ran inside the ssh session: a dropped connection ended it. --detach starts it in
  a session of its own, logging to ~/jaxft-train.log, and a later launch onto that VM refuses to
  re-ship the code under it."""
  run, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--detach', '--delete',
                           '--', *TRAIN)
  assert run.returncode == 2 and 'would delete the VM under the --detach training' in run.stderr
  assert calls == []
  run, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--detach', '--', *TRAIN)
  assert run.returncode == 0, run.stderr
  assert [c[3] for c in calls] == ['create', 'ssh', 'ssh', 'ssh']
  follow = shlex.split(run.stdout.splitlines()[-1])  # The command it prints to follow the log.
  assert follow == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1', '--zone=z', '--worker=0',
                    '--command=tail -n 50 -f jaxft-train.log']
  # The worker's side, in a real bash: a stand-in `python` that logs and then runs on.
  home, bin_dir = tmp_path / 'home', tmp_path / 'vm_bin'
  (home / 'jaxft' / '.venv' / 'bin').mkdir(parents=True)
  (home / 'jaxft' / '.venv' / 'bin' / 'activate').write_text('')
  bin_dir.mkdir()
  (bin_dir / 'python').write_text('#!/bin/sh\necho "started $*"\nsleep 60\n')
  (bin_dir / 'python').chmod(0o755)
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(home)}
  subprocess.run(['/bin/bash', '-c', remote(calls[3])], cwd=home, env=env, check=True, timeout=20)
  pid = int((home / 'jaxft-train.pid').read_text())
  try:
    for _ in range(100):  # Its first line, once it has started.
      if (home / 'jaxft-train.log').exists() and (home / 'jaxft-train.log').read_text():
        break
      time.sleep(0.05)
    assert (home / 'jaxft-train.log').read_text().startswith(
        'started -m jaxft.train --config.distributed.enabled=True --config=configs/demo.py')
    stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    assert int(stat[3]) == pid  # Its own session: the ssh session's hangup does not reach it.
    # A relaunch (the code is re-shipped first) stops on every worker where it still runs.
    _, calls = fake_gcloud('--name', 'tpu1', '--zone', 'z', '--repo', 'r', '--skip-create', '--',
                           *TRAIN)
    idle = remote(calls[0]).split('; rm -rf jaxft', 1)[0]
    check = subprocess.run(['/bin/bash', '-c', idle], cwd=home, env=env, capture_output=True,
                           text=True, timeout=20)
    assert check.returncode == 1 and (f'a detached jaxft.train (pid {pid}) is still running'
                                      in check.stderr)
  finally:
    os.killpg(pid, signal.SIGTERM)  # Its session's group: the stand-in and its sleep.
  for _ in range(100):  # (Not our child: setsid's session is reaped by init.)
    if not os.path.exists(f'/proc/{pid}'):
      break
    time.sleep(0.05)
  assert subprocess.run(['/bin/bash', '-c', idle], cwd=home, env=env, timeout=20).returncode == 0
