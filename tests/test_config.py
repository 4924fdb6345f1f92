import json
import os
import shutil
import subprocess
import sys

import pytest

from jaxft import config as config_lib


def test_overrides_are_typed_and_nested(root):
  cfg, workdir = config_lib.parse_args([
      '--config=configs/demo.py', '--config.optim.lr=0.01', '--config.train.steps=7',
      '--config.model.num_layers=3', '--config.checkpoint.async_save=false',
      '--config.data.train=a.jsonl'])
  assert cfg.optim.lr == 0.01 and cfg.train.steps == 7 and cfg.model.num_layers == 3
  assert cfg.checkpoint.async_save is False and cfg.data.train == 'a.jsonl'
  assert workdir == os.path.join('runs', 'demo')
  # '--name value' is read as '--name=value'.
  spaced, spaced_workdir = config_lib.parse_args([
      '--config', 'configs/demo.py', '--config.optim.lr', '0.01', '--config.train.steps=7',
      '--config.model.num_layers', '3', '--config.checkpoint.async_save', 'false',
      '--config.data.train', 'a.jsonl', '--workdir', 'runs/x'])
  assert spaced.to_dict() == cfg.to_dict() and spaced_workdir == 'runs/x'
  negative, _ = config_lib.parse_args(['--config', 'configs/demo.py', '--config.seed', '-3',
                                       '--config.optim.lr', '-0'])
  assert negative.seed == -3 and negative.optim.lr == 0


def test_bench_flags_take_both_forms_and_name_a_bad_number():
  from jaxft import bench
  with pytest.raises(config_lib.ConfigError, match=r'--steps: at least 1 step is timed'):
    bench.main(['--config=configs/demo.py', '--steps', '0'])
  with pytest.raises(config_lib.ConfigError, match=r"--prompt-len \+ --new <= the model's 64 "
                     r'positions; got 1, 40, 40'):
    bench.main(['--config=configs/demo.py', '--decode', '--prompt-len=40', '--new=40',
                '--config.model.max_len=64', '--config.reuse_host_memory=False'])
  with pytest.raises(config_lib.ConfigError, match=r'train\.batch_size=12 must divide'):
    bench.main(['--config=configs/demo.py', '--steps=1', '--config.train.batch_size=12',
                '--config.reuse_host_memory=False'])
  with pytest.raises(config_lib.ConfigError, match=r"--steps: expected a whole number, got 'five'"):
    bench.main(['--config=configs/demo.py', '--steps', 'five'])
  with pytest.raises(config_lib.ConfigError, match=r"--warmup: expected a whole number, got ''"):
    bench.main(['--config=configs/demo.py', '--warmup='])
  with pytest.raises(config_lib.ConfigError, match=r"--batch, --new: --decode's; the train "
                     r"step's batch is --config\.train\.batch_size"):
    bench.main(['--config=configs/demo.py', '--batch=8', '--new', '4'])
  for other in ('--compile-only', '--target=h100', '--decode'):
    with pytest.raises(config_lib.ConfigError, match=r'--compare-hf times train steps; '
                       r'--compile-only, --target and --decode run none'):
      bench.main(['--config=configs/demo.py', '--compare-hf', other])


def test_bench_json_path_is_checked_before_the_run(tmp_path, capsys, monkeypatch):
  """--json: missing folders are made, and a path that cannot be a file fails before anything is
  compiled (it used to fail after the whole run, losing the printed JSON line too)."""
  from conftest import SMALL
  from jaxft import bench, train
  argv = ['--config=configs/demo.py', '--compile-only'] + \
      [f'--config.{k}={v}' for k, v in SMALL.items()]
  setup = train.setup
  monkeypatch.setattr(train, 'setup', lambda *a: pytest.fail('ran before checking --json'))
  (tmp_path / 'file').write_text('')
  with pytest.raises((FileExistsError, NotADirectoryError)):
    bench.main(argv + [f'--json={tmp_path}/file/out.json'])
  with pytest.raises(IsADirectoryError, match=r'--json=.* is a directory; give a file name'):
    bench.main(argv + [f'--json={tmp_path}'])
  monkeypatch.setattr(train, 'setup', setup)
  monkeypatch.setenv('HOME', str(tmp_path))  # --json=~/...: no shell expands that ~.
  out = tmp_path / 'a' / 'b' / 'plan.json'
  bench.main(argv + ['--json=~/a/b/plan.json'])
  printed = capsys.readouterr().out.splitlines()[-1]
  assert json.loads(out.read_text()) == json.loads(printed)
  assert json.loads(printed)['step_memory_bytes'] > 0


def test_variant_and_default_workdir():
  cfg, workdir = config_lib.parse_args(['--config=configs/demo.py:next_token'])
  assert cfg.objective == 'next_token' and workdir == os.path.join('runs', 'demo_next_token')
  with pytest.raises(ValueError, match="no variant 'nope'"):
    config_lib.parse_args(['--config=configs/demo.py:nope'])


def test_unknown_key_names_nearest():
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim\.lrr'.*optim\.lr"):
    config_lib.parse_args(['--config=configs/demo.py', '--config.optim.lrr=1'])

  # A bare leaf name is matched by its last part.
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown config key 'lr'; did you mean optim\.lr\?"):
    config_lib.parse_args(['--config=configs/demo.py', '--config.lr=1'])


def test_a_config_file_gets_the_checks_of_an_override(tmp_path):
  """A key configs/common.py lacks, or None / a bool for a number, set in a config file: refused
  naming the file and key, as the same override would be."""
  def write(name, body):  # (A file each: one rewritten within the second may be read as cached.)
    mine = tmp_path / name
    mine.write_text('from configs import common\n\ndef get_config(arg=None):\n'
                    f'  c = common.get_config()\n  {body}\n  return c\n')
    return mine
  mine = write('typo.py', 'c.train.setps = 5')
  with pytest.raises(config_lib.ConfigError, match=rf"^{mine}: unknown config key 'train\.setps'; "
                     r'did you mean train\.steps'):
    config_lib.parse_args([f'--config={mine}'])
  for i, (body, key, value, want) in enumerate((
      ('c.train.eval_every = None', 'train.eval_every', 'None', 'int'),
      ('c.train.grad_accum = True', 'train.grad_accum', 'True', 'int'),
      ('c.optim.lr = None', 'optim.lr', 'None', 'float'))):  # (A bool it makes 0.0 or 1.0.)
    mine = write(f'bad{i}.py', body)
    with pytest.raises(config_lib.ConfigError, match=rf"^{mine}: config key '{key}' is {value}; "
                       rf'expected {want}'):
      config_lib.parse_args([f'--config={mine}'])
  # A placeholder takes its number; a string key stays settable.
  mine = write('good.py', 'c.model.num_layers = 3; c.data.train = "a.jsonl"')
  cfg, _ = config_lib.parse_args([f'--config={mine}'])
  assert cfg.model.num_layers == 3 and cfg.data.train == 'a.jsonl'


def test_wrong_type_is_rejected():
  with pytest.raises(config_lib.ConfigError, match=r"train\.steps.*'ten'"):
    config_lib.parse_args(['--config=configs/demo.py', '--config.train.steps=ten'])
  with pytest.raises(config_lib.ConfigError, match=r"train\.steps.*2\.5"):
    config_lib.parse_args(['--config=configs/demo.py', '--config.train.steps=2.5'])
  # ml_collections itself would take None anywhere and a bool as a number.
  for key, text, want in (('train.steps', 'True', 'int'), ('optim.lr', 'None', 'float'),
                          ('model.max_len', 'false', 'int')):  # (A placeholder's type.)
    with pytest.raises(config_lib.ConfigError, match=rf"config key '{key}': '{text}' \(expected "
                       rf"{want}\): {text.title()} is not of type {want}"):
      config_lib.parse_args(['--config=configs/demo.py', f'--config.{key}={text}'])
  # Counts the trainer divides by, out of range: named before anything runs.
  for key, value, least in (('train.grad_accum', 0, 1), ('checkpoint.every', 0, 1),
                            ('train.eval_every', 0, 1), ('train.eval_batches', -1, 0)):
    with pytest.raises(config_lib.ConfigError, match=rf"config key '{key}' is {value}; it must be "
                       rf">= {least}"):
      config_lib.parse_args(['--config=configs/demo.py', f'--config.{key}={value}'])


def own_config(tmp_path, pythonpath):
  """Write a config of one's own, tmp_path/mine.py, on configs/common.py, and load it with an
  override in a process of its own run from tmp_path (nothing of the repository imported before,
  PYTHONPATH as given): (its path, [train.steps, seed, optim.lr, the COMMON read])."""
  mine = tmp_path / 'mine.py'
  mine.write_text('from configs import common\n\ndef get_config(arg=None):\n'
                  '  c = common.get_config()\n  c.train.steps = 7\n  return c\n')
  code = (f'from jaxft import config; c = config.parse_args(["--config={mine}", '
          f'"--config.seed=3"])[0]; print(c.train.steps, c.seed, c.optim.lr, config.COMMON)')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, 'PYTHONPATH': pythonpath} if pythonpath else env)
  assert out.returncode == 0, out.stderr
  return mine, out.stdout.split()


def test_a_config_file_elsewhere_extends_common(tmp_path):
  """A config of one's own, outside the repository, builds on jaxft's configs/common.py; one
  whose import fails is named."""
  mine, out = own_config(tmp_path, '')
  assert out == ['7', '3', '0.0003', os.path.abspath(config_lib.COMMON)]
  mine.write_text('import no_such_module\n')
  with pytest.raises(config_lib.ConfigError, match=rf"{mine}: ModuleNotFoundError: No module named "
                                                   r"'no_such_module'"):
    config_lib.parse_args([f'--config={mine}'])
  with pytest.raises(config_lib.ConfigError, match=r"configs/common.py:typo: configs/common.py has "
                                                   r"no variants \(got 'typo'\)"):
    config_lib.parse_args(['--config=configs/common.py:typo'])


def test_an_installed_wheel_carries_configs_common(tmp_path):
  """`pip install .` (not -e) ships configs/: jaxft.config reads configs/common.py's defaults
  from the installed copy, and a config of one's own elsewhere imports it."""
  repo, src = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), tmp_path / 'src'
  src.mkdir()
  for name in ('jaxft', 'configs', 'pyproject.toml', 'README.md'):  # (No stale build/ of ours.)
    if os.path.isdir(os.path.join(repo, name)):
      shutil.copytree(os.path.join(repo, name), src / name,
                      ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(os.path.join(repo, name), src / name)
  pip = [sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check']
  subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', tmp_path / 'wheel',
                  src], check=True, capture_output=True)
  wheel, = (tmp_path / 'wheel').glob('jaxft-*.whl')
  subprocess.run([*pip, 'install', '--no-deps', '--no-compile', '--target', tmp_path / 'site',
                  wheel], check=True, capture_output=True)
  _, out = own_config(tmp_path, str(tmp_path / 'site'))
  assert out == ['7', '3', '0.0003', str(tmp_path / 'site' / 'configs' / 'common.py')]


def test_missing_file_and_flag_errors():
  with pytest.raises(config_lib.ConfigError, match='config file not found: nope.py'):
    config_lib.parse_args(['--config=nope.py'])
  with pytest.raises(config_lib.ConfigError, match=r'--config=README.md: a config is a Python file '
                                                   r'with get_config\(\), e.g. configs/demo.py'):
    config_lib.parse_args(['--config=README.md'])
  with pytest.raises(config_lib.ConfigError, match="unknown flag '--lr'"):
    config_lib.parse_args(['--config=configs/demo.py', '--lr=1'])


def test_help_lists_every_key_as_an_override_that_parses_back(capsys):
  """--help prints the usage and one --config.key=value line per key, overrides applied; fed
  back, those lines rebuild the same config (placeholders, shown as 'None (type)', aside)."""
  with pytest.raises(SystemExit) as exit_info:
    config_lib.parse_args(['--config=configs/demo.py:labeled_pair', '--config.seed=4', '--help'])
  assert exit_info.value.code == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('usage: python -m jaxft.train --config=FILE')
  shown = [l.strip() for l in lines if l.startswith('  --config.')]
  cfg = config_lib.load_file('configs/demo.py:labeled_pair')
  config_lib.override(cfg, 'seed', '4')
  assert [l.partition('=')[0][len('--config.'):] for l in shown] == list(config_lib.flatten(cfg))
  assert '--config.model.num_layers=None (int)' in shown and '--config.seed=4' in shown
  settable = [l for l in shown if not l.endswith(')')]
  rebuilt, _ = config_lib.parse_args(['--config=configs/demo.py'] + settable)
  assert rebuilt.to_dict() == cfg.to_dict() and rebuilt.objective == 'labeled_pair'
  with pytest.raises(SystemExit):
    config_lib.parse_args(['-h'])
  assert 'With --config=FILE, --help lists every key' in capsys.readouterr().out


def test_config_is_locked_and_saved(tmp_path):
  cfg, _ = config_lib.parse_args(['--config=configs/demo.py', '--config.seed=3'])
  with pytest.raises(AttributeError):
    cfg.new_key = 1
  config_lib.save(cfg, str(tmp_path))
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['seed'] == 3 and saved['data']['source'] == 'demo'
  assert config_lib.flatten(saved).keys() == config_lib.flatten(cfg).keys()


def test_key_lists_name_real_keys_or_sections():
  """RESUME_FREE and evaluate's EVAL_OVERRIDES: exact keys, or sections written 'name.'."""
  from jaxft import evaluate
  keys = list(config_lib.flatten(config_lib.load_file(config_lib.COMMON)))
  for names in (config_lib.RESUME_FREE, evaluate.EVAL_OVERRIDES):
    for n in names:
      assert [k for k in keys if config_lib.within(k, [n])], n
  assert config_lib.within('checkpoint.every', ['checkpoint.'])
  assert not config_lib.within('train.steps_x', ['train.steps'])
  assert not config_lib.within('checkpoint', ['checkpoint.'])


def test_demo_overrides_only_what_differs(root):
  """Every key in demo.py exists in common.py: config files cannot introduce keys."""
  common = config_lib.load_file(os.path.join(root, 'configs', 'common.py'))
  demo = config_lib.load_file(os.path.join(root, 'configs', 'demo.py'))
  assert list(config_lib.flatten(common)) == list(config_lib.flatten(demo))


def test_command_line_reports_user_errors_in_one_line(root):
  import subprocess
  import sys
  done = subprocess.run([sys.executable, '-m', 'jaxft.train', '--config=configs/demo.py',
                         '--config.optim.lrr=1'], cwd=root, capture_output=True, text=True)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'optim.lrr'")
  assert 'Traceback' not in done.stderr


def test_write_file_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
  """A write that fails midway (a full disk, a kill) leaves the old file as it was, no temp file."""
  config_lib.write_file(str(tmp_path), 'summary.json', '{"steps": 4}')
  def full_disk(self, text):
    open(self, 'w').write(text[:3])
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(type(config_lib.epath.Path(tmp_path)), 'write_text', full_disk)
  with pytest.raises(OSError, match='No space left'):
    config_lib.write_file(str(tmp_path), 'summary.json', '{"steps": 8}')
  assert os.listdir(tmp_path) == ['summary.json']
  assert json.load(open(tmp_path / 'summary.json')) == {'steps': 4}
