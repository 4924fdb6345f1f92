"""Config files + command-line overrides -> one locked ml_collections.ConfigDict.

    python -m jaxft.train --config=configs/demo.py[:variant] [--config.a.b=value ...] [--workdir=DIR]
"""
import ast
import difflib
import importlib.util
import json
import os
import sys

import ml_collections
from etils import epath


# Every key with its default (the repository's configs/common.py).
COMMON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'common.py')


class ConfigError(ValueError):
  """A config file, key or value that cannot be used; the message names it."""


def load_file(spec):
  """`path/to/file.py[:arg]` -> the file's get_config(arg), locked."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  if not path.endswith('.py'):  # (A run's config.json is its record, read by resumes.)
    raise ConfigError(f'--config={spec}: a config is a Python file with get_config(), e.g. '
                      f'configs/demo.py')
  # Config files import their neighbours (`from configs import common`): their repo first, then
  # jaxft's (a config file of yours elsewhere extends jaxft's configs/common.py).
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  if (ours := os.path.dirname(os.path.dirname(COMMON))) not in sys.path:
    sys.path.append(ours)
  module_spec = importlib.util.spec_from_file_location('_jaxft_config', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except ImportError as e:
    raise ConfigError(f'{path}: {type(e).__name__}: {e}') from None
  try:
    cfg = module.get_config(arg or None)
  except ValueError as e:  # An unknown variant and the like: name the file.
    raise ConfigError(f'{spec}: {e}') from None
  if os.path.abspath(path) != COMMON:
    check_keys(cfg, spec)
  cfg.lock()
  return cfg


def check_keys(cfg, spec):
  """Refuse what config file `spec` sets that an override could not: a key configs/common.py
  lacks, or None or a bool for a number (ml_collections takes both)."""
  defaults = flatten(load_file(COMMON))  # (By its path: a user's `configs` may come first.)
  for key, value in flatten(cfg).items():
    if key not in defaults:
      raise ConfigError(f'{spec}: unknown config key {key!r}{near_keys(key, list(defaults))}')
    old = defaults[key]
    number = isinstance(old, (int, float)) and not isinstance(old, bool)
    if number and (value is None or isinstance(value, bool)):
      raise ConfigError(f'{spec}: config key {key!r} is {value!r}; expected '
                        f'{type(old).__name__} (configs/common.py has {old!r})')


def flatten(tree, prefix=''):
  """{dotted leaf key: value} of a ConfigDict or of its dict (a config.json's)."""
  out = {}
  for k, v in tree.items():
    nested = isinstance(v, (dict, ml_collections.ConfigDict))
    out.update(flatten(v, f'{prefix}{k}.') if nested else {prefix + k: v})
  return out


def within(key, names):
  """Whether dotted `key` is one of `names`, or under one of them written as 'section.'."""
  return any(key == n or (n.endswith('.') and key.startswith(n)) for n in names)


def _parse_value(old, text):
  """Parse an override the way the existing field is typed; strings stay as written."""
  if isinstance(old, str):
    return text
  if isinstance(old, bool) or text in ('True', 'False', 'true', 'false'):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'expected a bool, got {text!r}')
    return text.lower() in ('true', '1')
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A string for a None-valued string placeholder; the type check below decides.


def _parent(cfg, key):
  """Dotted `key` -> (the ConfigDict holding its leaf, the leaf's name)."""
  *parents, leaf = key.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  return node, leaf


def near_keys(key, keys):
  """'; did you mean ...?' for an unknown `key`: keys close to it whole or by their last part
  (`lr` -> optim.lr), else all of them."""
  leaf = lambda k: k.rpartition('.')[2]
  leaves = difflib.get_close_matches(leaf(key), {leaf(k) for k in keys}, n=3, cutoff=0.8)
  near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
  near = list(dict.fromkeys(near + [k for k in keys if leaf(k) in leaves]))
  return f'; did you mean {", ".join(near)}?' if near else f'; valid keys: {", ".join(keys)}'


def override(cfg, key, text):
  """Set dotted `key` from its command-line text, with the field's type checked."""
  keys = list(flatten(cfg))
  if key not in keys:
    raise ConfigError(f'unknown config key {key!r}{near_keys(key, keys)}')
  node, leaf = _parent(cfg, key)
  old = node[leaf]
  kind = type(old) if old is not None else node.get_type(leaf)  # A placeholder's type.
  want = kind.__name__
  try:
    value = _parse_value(old, text)
    # ml_collections lets None into any field and a bool into a number one: not from here.
    if (value is None and old is not None) or (isinstance(value, bool) and kind in (int, float)):
      raise TypeError(f'{value!r} is not of type {want}')
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'bad value for config key {key!r}: {text!r} (expected {want}): {e}') from None


# Counts the trainer divides by or loops over: at least this much.
AT_LEAST = {1: ('train.steps', 'train.batch_size', 'train.grad_accum', 'train.log_every',
                'train.eval_every', 'checkpoint.every', 'checkpoint.keep', 'data.seq_len',
                'model.vocab_multiple', 'data.demo.num_examples', 'model.num_layers',
                'model.num_heads', 'model.embed_dim', 'model.mlp_dim', 'model.max_len',
                'model.vocab_size', 'model.attention_block', 'distributed.timeout_s'),
            0: ('train.eval_batches', 'train.exact_match_examples', 'optim.lr',
                'optim.warmup_steps', 'optim.skip_nonfinite', 'optim.clip_norm',
                'optim.weight_decay', 'data.num_labels', 'model.dropout', 'model.loss_chunk',
                'data.val_fraction', 'data.test_fraction', 'data.split_seed', 'optim.min_lr_ratio',
                'optim.b1', 'optim.b2', 'optim.eps', 'distributed.num_processes'),  # (0: detect.)
            -1: ('distributed.process_id',)}  # (-1: detect.)
# Fractions and decay rates: below this.
BELOW = {1: ('model.dropout', 'data.val_fraction', 'data.test_fraction', 'optim.b1', 'optim.b2')}
# Fractions that may be whole: at most this.
AT_MOST = {1: ('optim.min_lr_ratio',)}


def check(cfg):
  """Refuse a value out of its range (AT_LEAST, BELOW, AT_MOST), naming the key. (A run's config.json
  from an older jaxft may lack a key; None is a placeholder's 'unset'.)"""
  values = flatten(cfg)
  for bounds, out, say in ((AT_LEAST, lambda v, b: v < b, '>='), (BELOW, lambda v, b: v >= b, '<'),
                           (AT_MOST, lambda v, b: v > b, '<=')):
    for bound, keys in bounds.items():
      for key in keys:
        if values.get(key) is not None and out(values[key], bound):
          raise ConfigError(f'config key {key!r} is {values[key]!r}; it must be {say} {bound}')


USAGE = '--config=FILE[:variant] [--config.key=value ...] [--workdir=DIR]'


def help_text(cfg, usage):
  """`usage`, then every key the config takes as a ready-to-edit override with its value."""
  lines = [f'usage: {usage}', '']
  if cfg is None:
    return '\n'.join(lines + ['With --config=FILE, --help lists every key that file takes.'])
  lines.append('Config keys, each settable as --config.key=value (defaults and why: '
               'configs/common.py):')
  for key in flatten(cfg):
    node, leaf = _parent(cfg, key)
    value = node[leaf]
    shown = f'None ({node.get_type(leaf).__name__})' if value is None else value
    lines.append(f'  --config.{key}={shown}')
  return '\n'.join(lines)


def equals_form(argv):
  """argv with each '--name value' pair written '--name=value': both forms are accepted."""
  out = []
  for a in argv:
    if out and out[-1].startswith('--') and '=' not in out[-1] and not a.startswith('--') \
        and a != '-h':  # (A value may start with '-': --config.seed -3.)
      out[-1] += '=' + a
    else:
      out.append(a)
  return out


def parse_args(argv, usage='python -m jaxft.train ' + USAGE):
  """argv -> (locked config, workdir). Accepts --config=, --config.key=value and --workdir= (or
  with a space for the '='); --help (or -h) prints `usage` and the config's keys with the
  overrides applied, then exits."""
  argv = equals_form(argv)
  wants_help = '--help' in argv or '-h' in argv
  spec, workdir, overrides = None, None, []
  for arg in (a for a in argv if a not in ('--help', '-h')):
    name, eq, value = arg.partition('=')
    if not eq:
      raise ConfigError(f'expected --name=value, got {arg!r}')
    if name == '--config':
      spec = value
    elif name == '--workdir':
      workdir = value
    elif name.startswith('--config.'):
      overrides.append((name[len('--config.'):], value))
    else:
      raise ConfigError(f'unknown flag {name!r}: use {USAGE} (--help lists the keys)')
  if spec is None and wants_help:
    print(help_text(None, usage))
    sys.exit(0)
  if spec is None:
    raise ConfigError('missing --config=path/to/config.py[:variant]')
  cfg = load_file(spec)
  for key, value in overrides:
    override(cfg, key, value)
  check(cfg)
  if wants_help:
    print(help_text(cfg, usage))
    sys.exit(0)
  if workdir is None:
    name = os.path.splitext(os.path.basename(spec.partition(':')[0]))[0]
    variant = spec.partition(':')[2]
    workdir = os.path.join('runs', f'{name}_{variant}' if variant else name)
  return cfg, os.path.expanduser(workdir)  # (No shell expands the ~ of --workdir=~/runs/x.)


def write_file(workdir, name, text):
  """Write <workdir>/<name> (text, or bytes) whole, or leave it as it was: a kill or a full disk
  mid-write leaves no file cut short. The workdir may be local or remote (gs://..., via epath:
  objects are written whole)."""
  path = epath.Path(workdir) / name
  path.parent.mkdir(parents=True, exist_ok=True)
  write = lambda p: p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
  if '://' in str(workdir):
    write(path)
    return
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'  # The same filesystem: renamed in place.
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():  # (Only when the write failed.)
      tmp.unlink()


# Settings of the process a run ran in, which leave its results the same to the bit: a finished
# run is reused whatever they were (experiments/ablate.py).
PROCESS_ONLY = ('reuse_host_memory', 'compile_cache', 'threefry_gpu_kernel')
# What a rerun may change and still resume: how the run is carried out, not what it computes.
# (train.steps moves the end of the lr schedule, so the lr from the resumed step on changes.)
RESUME_FREE = PROCESS_ONLY + (
    'train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
    'train.exact_match_examples', 'train.grad_accum', 'checkpoint.', 'mesh.',
    'distributed.', 'optim.offload', 'optim.skip_nonfinite',
    'model.attention', 'model.attention_block', 'model.remat', 'model.scan_layers',
    'model.grad_barrier', 'model.loss_chunk', 'model.logsumexp', 'model.layernorm_vjp',
    # Where the data is (moved to another disk or bucket): the records themselves are
    # compared by the fingerprints saved with each checkpoint.
    'data.train', 'data.val', 'data.test', 'data.tfds_data_dir')


def differences(saved, cfg):
  """[(key, saved value, value in cfg)] where a config.json's dict and `cfg` differ (keys only
  one side has, from another jaxft version, are not compared)."""
  saved, now = flatten(saved), flatten(json.loads(json.dumps(cfg.to_dict())))  # Tuples as lists.
  return [(k, saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]]


def resume_changes(cfg, workdir):
  """The keys (key, saved, now) in which `cfg` differs from <workdir>/config.json, the config
  of the run a rerun resumes: those in RESUME_FREE are returned, any other is an error that
  lists them all."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return []
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path} is unreadable ({e}): cut short? It records the config {workdir} was '
                      f'trained with; put it back, or remove it to resume without comparing '
                      f'the configs') from None
  changed = differences(saved, cfg)
  # keep_best ranks every save by the val loss of train.eval_batches batches: of as many, always.
  ranked = cfg.checkpoint.keep_best and 'train.eval_batches'
  free = lambda k: within(k, RESUME_FREE) and k != ranked
  why = {ranked: ' (checkpoint.keep_best ranks saves by the val loss of this many batches)'}
  fixed = [f'{k}: run {old!r} vs now {new!r}{why.get(k, "")}' for k, old, new in changed
           if not free(k)]
  if fixed:
    raise ConfigError(
        f'{workdir} was trained with another config; resuming would mix the two ({len(fixed)} '
        f'differences):\n  ' + '\n  '.join(fixed) + f'\nrerun with the config and overrides it '
        f'was trained with (recorded in {path}), or use a new --workdir (with '
        f'--config.train.init_from={workdir} to start from its params)')
  return [c for c in changed if free(c[0])]


def save(cfg, workdir):
  """Write the resolved config as <workdir>/config.json (what was run, for the record)."""
  write_file(workdir, 'config.json', json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
