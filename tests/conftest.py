"""8 fake CPU devices for every test (set before jax is imported), and small-config helpers."""
import atexit
import hashlib
import os
import shutil
import sys
import tempfile

# The tests' programs are tiny and compiled once or twice each, so XLA's CPU backend is told not
# to optimize its machine code (LLVM -O0, the classic fusion emitters): the small config's train
# step then compiles in 1.4 s instead of 6-8 s and runs in 30 ms instead of 13; the suite took
# 1113 s instead of 1646. The HLO passes (fusion, sharding, the scheduler) are XLA's usual ones.
def xla_flags(devices):
  """XLA_FLAGS for a test process (or subprocess) of `devices` fake CPU devices."""
  return (f'--xla_force_host_platform_device_count={devices} '
          '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')


# What those two flags turn off, as `compiler_options` for one compile, where a test needs the
# machine code a user's run gets.
DEFAULT_CODEGEN = {'xla_backend_optimization_level': 3, 'xla_cpu_use_fusion_emitters': True}
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags(8)).strip()
# The CPU only, here and in the tests' subprocesses: the `aot` extra's GPU and TPU plugins (for
# jaxft.bench --target) would otherwise look for their devices.
os.environ['JAX_PLATFORMS'] = 'cpu'
# One XLA compilation cache for the session, this process and its subprocesses (empty at the
# start, removed at the end): the many small runs compile the same programs (the init, train
# and eval steps of one config) again and again, the subprocesses' most of all (the SIGKILL
# test: 72 -> 66 s; before the unoptimized codegen above, 127 -> 79 s). A compiled program read
# back is the program compiled; an entry cut short by a test's SIGKILL is recompiled (JAX warns).
_CACHE = tempfile.mkdtemp(prefix='jaxft-test-xla-cache-')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from jaxft import config as config_lib  # noqa: E402

# A model and corpus small enough that a few steps take well under a second on 8 fake devices.
SMALL = {
    'model.num_layers': '2', 'model.num_heads': '4', 'model.embed_dim': '32', 'model.max_len': '64',
    'data.seq_len': '32', 'data.demo.num_examples': '2000', 'train.batch_size': '16',
    'train.log_every': '1', 'train.eval_every': '5', 'train.eval_batches': '2',
    'optim.warmup_steps': '2',
    # train.main / bench.main would retune malloc for the whole test process (process-wide, once):
    # tests/test_switches.py runs that switch in subprocesses.
    'reuse_host_memory': 'False',
    # train.main would point jax's persistent compilation cache from the session's (above) to
    # ~/.cache for the whole test process (tests/test_train.py runs that switch in subprocesses).
    'compile_cache': '',
}


def _small(overrides):
  """SMALL plus `overrides` given as keyword arguments ('__' stands for '.')."""
  return {**SMALL, **{k.replace('__', '.'): str(v) for k, v in overrides.items()}}


def small_config(**overrides):
  """configs/demo.py with SMALL and `overrides` applied."""
  cfg = config_lib.load_file(os.path.join(ROOT, 'configs', 'demo.py'))
  for k, v in _small(overrides).items():
    config_lib.override(cfg, k, v)
  return cfg


def small_argv(workdir, **overrides):
  """Command line for `python -m jaxft.train` with the same small config."""
  return ['--config=configs/demo.py', f'--workdir={workdir}'] + \
      [f'--config.{k}={v}' for k, v in _small(overrides).items()]


def snapshot(directory):
  """{relative path: sha256} of every file under `directory`: to show nothing was changed."""
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(base, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def cli_error(argv, monkeypatch):
  """The `error: ...` message that `python -m jaxft.train argv` exits with (via jaxft.cli, in
  process); fails if it ends any other way."""
  from jaxft import cli, train
  monkeypatch.setattr(sys, 'argv', ['jaxft.train', *argv])
  with pytest.raises(SystemExit) as exit_info:
    cli.run(train.main)
  message = str(exit_info.value.code)
  assert message.startswith('error: '), message
  return message


@pytest.fixture
def root():
  return ROOT
