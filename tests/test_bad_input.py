"""The bad-input catalogue: each case runs `python -m jaxft.train` (through jaxft.cli, in process)
against a copy of a finished run's workdir and must end in an `error: ...` message, not a
traceback, that names the culprit (key, value, file:line, field, parameter, path), with every
file of the workdir intact."""
import json
import os
import re
import shutil

import pytest

from conftest import cli_error, small_argv, snapshot
from jaxft import train


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('good') / 'run')
  train.main(small_argv(wd, train__steps=2, checkpoint__every=2))
  return wd


def jsonl(path, *lines):
  """A data file from raw lines (bytes or str) and returns its path."""
  with open(path, 'wb') as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else line.encode()) + b'\n')
  return str(path)


def files(tmp, train_file, **more):
  """Overrides that train on `train_file` (val/test carved from it)."""
  return {'data__source': 'files', 'data__train': train_file, 'data__val_fraction': 0.2,
          'data__test_fraction': 0.2, **more}


def write(path, text):
  path.write_text(text)
  return path


def classification_rows(tmp, bad_line):
  rows = [json.dumps({'text': f'{i}+{i}=', 'label': i % 3}) for i in range(40)]
  return jsonl(tmp / 'cls.jsonl', *rows[:3], bad_line, *rows[3:])


def hf_model(tmp, **overrides):
  from test_convert import hf_dir  # torch + transformers: only the cases that need them.
  return hf_dir(tmp / 'hf', **overrides)


# name -> (overrides or fn(tmp) -> overrides, workdir, expected text (a regex)); workdir: False
# for a copy of the finished run, True for a fresh one the error must leave empty, 'drawn' for a
# fresh one where the train stream meets the record (tokenized as drawn): no checkpoint saved.
CASES = {
    'unknown config key': (
        {'train__stepz': 3}, False, r"unknown config key 'train\.stepz'.*did you mean.*train\.steps"),
    'wrong value type': (
        {'train__steps': 'many'}, False, r"bad value for config key 'train\.steps': 'many' "
        r"\(expected int\)"),
    'unknown config variant': (
        None, False, r"configs/demo\.py:nope: configs/demo\.py has no variant 'nope'"),
    'heads do not divide embed': (
        {'model__num_heads': 5}, False,
        r'model\.embed_dim=32 is not divisible by model\.num_heads=5'),
    'tensor parallelism does not divide heads': (
        {'mesh__data': 1, 'mesh__tensor': 8}, False,
        r"^error: \['params'\]\['h'\]\[0\]\['attn'\]\['c_attn_bias'\]\.value has a dimension of 4 "
        r"\(its 'heads' axis: model\.num_heads\), not divisible over mesh\.tensor=8 devices"),
    'batch not divisible by data x fsdp': (
        {'train__batch_size': 12}, False, r'train\.batch_size=12 must divide into '
        r'train\.grad_accum=1 micro-batches over mesh\.data x mesh\.fsdp = 8 devices'),
    'mesh larger than the devices': (
        {'mesh__data': 3}, False, r"mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices, "
        r'have 8'),
    'mesh size of zero': (
        {'mesh__fsdp': 0}, False, r'mesh\.data/fsdp/tensor are device counts \(or -1: the rest\), '
        r'got \[-1, 0, 1\]'),
    'model size below its range': (
        {'model__attention_block': 0}, False,
        r"config key 'model\.attention_block' is 0; it must be >= 1"),
    'hold-out fraction of the whole': (
        {'data__val_fraction': 1.0}, False,
        r"config key 'data\.val_fraction' is 1\.0; it must be < 1"),
    'negative final lr (gradient ascent)': (
        {'optim__min_lr_ratio': -1.0}, False,
        r"config key 'optim\.min_lr_ratio' is -1\.0; it must be >= 0"),
    'final lr above the peak': (
        {'optim__min_lr_ratio': 1.5}, False,
        r"config key 'optim\.min_lr_ratio' is 1\.5; it must be <= 1"),
    'unknown compute dtype': (
        {'model__dtype': 'bf16'}, False,
        r"unknown model\.dtype 'bf16'; known: float32, bfloat16, float16"),
    'seq_len above the model positions': (
        {'data__seq_len': 100}, False, r"data\.seq_len=100 > the model's 64 positions \(model\.max_len, or "
        r"model\.size='tiny''s\)"),
    'unknown objective': (
        {'objective': 'regression'}, False,
        r"unknown objective 'regression'; known: next_token, labeled_pair, classification"),
    'missing data file': (
        lambda tmp: files(tmp, str(tmp / 'nope.jsonl')), False,
        r"no data file matches '.*/nope\.jsonl'"),
    'empty data file': (
        lambda tmp: files(tmp, jsonl(tmp / 'empty.jsonl')), False,
        r'/empty\.jsonl: empty file \(no records\)'),
    'malformed JSONL line': (
        lambda tmp: files(tmp, jsonl(tmp / 'bad.jsonl', '{"text": "ok"}', '{"text": "cut')), False,
        r'/bad\.jsonl:2: malformed JSON line: Unterminated string starting at \(column 10\)'),
    'missing field': (
        lambda tmp: files(tmp, jsonl(tmp / 'body.jsonl', *['{"text": "a b c"}'] * 3,
                                     '{"body": "x"}')), False,
        r"/body\.jsonl:4: missing field 'text' \(has: body\)"),
    'invalid UTF-8': (
        lambda tmp: files(tmp, jsonl(tmp / 'latin1.jsonl', '{"text": "fine"}',
                                     b'{"text": "caf\xe9"}')), False,
        r'/latin1\.jsonl:2: invalid UTF-8 at byte 13 of the line'),
    'CSV row with too many cells': (
        lambda tmp: files(tmp, str(write(tmp / 't.csv', 'text\n' + 'a b c\n' * 20 +
                                         'one,two\n'))), False,
        r'/t\.csv:22: 2 cells, the header has 1'),
    'label out of range': (
        lambda tmp: files(tmp, classification_rows(tmp, '{"text": "1+1=", "label": 7}'),
                          objective='classification', data__seq_len=16), False,
        r"/cls\.jsonl:4: field 'label' = 7 is not a label \(an int in \[0, 3\) or one of "
        r"\['low', 'mid', 'high'\]\)"),
    'label of the wrong type': (
        lambda tmp: files(tmp, classification_rows(tmp, '{"text": "1+1=", "label": 1.0}'),
                          objective='classification', data__seq_len=16), False,
        r"/cls\.jsonl:4: field 'label' = 1\.0 is not a label"),
    'empty text': (
        lambda tmp: files(tmp, classification_rows(tmp, '{"text": "", "label": 1}'),
                          objective='classification', data__seq_len=16), False,
        r"/cls\.jsonl:4: field 'text' is empty"),
    'empty loss mask (completion truncated away)': (
        lambda tmp: files(tmp, jsonl(tmp / 'pairs.jsonl', *[json.dumps(
            {'prompt': 'x' * (60 if i == 2 else 5), 'completion': 'yes'}) for i in range(30)]),
            objective='labeled_pair', data__truncation_side='right'), 'drawn',
        r"/pairs\.jsonl:3: .*no .*supervised|/pairs\.jsonl:3: .*carries no loss"),
    'resume with another architecture': (
        {'model__embed_dim': 64, 'model__num_heads': 2}, False,
        r'/run was trained with another config; resuming would mix the two \(2 differences\):'
        r'\n  model\.embed_dim: run 32 vs now 64\n  model\.num_heads: run 4 vs now 2\nrerun with '
        r'the config and overrides it was trained with \(recorded in .*/run/config\.json\), or '
        r'use a new --workdir \(with --config\.train\.init_from=.*/run to start from its '
        r'params\)'),
    'resume with another objective and optimizer': (
        {'objective': 'labeled_pair', 'optim__clip_norm': 0.0}, False,
        r"another config.*\(2 differences\):\n  objective: run 'next_token' vs now "
        r"'labeled_pair'\n  optim\.clip_norm: run 1\.0 vs now 0\.0"),
    'init_from a missing checkpoint': (
        lambda tmp: {'train__init_from': str(tmp / 'nowhere')}, True,
        r'no jaxft checkpoint at .*/nowhere'),
    'init_from an HF dir without weights': (
        lambda tmp: {'train__init_from': 'hf:' + config_only(hf_model(tmp))}, True,
        r'/hf: no model\.safetensors\(\.index\.json\) \(has: config\.json, .*\); jaxft reads '
        r'safetensors only'),
    'init_from an HF model of another vocab': (
        lambda tmp: {'train__init_from': 'hf:' + hf_model(tmp, vocab_size=300)}, True,
        r'tokenizer_vocab: run 258 vs checkpoint 300'),
    'tokenizer directory missing': (
        lambda tmp: {'tokenizer': f'hf:{tmp}/no_tokenizer'}, False,
        r'tokenizer=hf:.*/no_tokenizer: no such directory'),
    'tokenizer file cut short': (
        lambda tmp: {'tokenizer': 'hf:' + cut_short(hf_model(tmp), 'tokenizer.json')}, False,
        r'tokenizer=hf:.*/hf could not be loaded \(JSONDecodeError: '),
    'init_from an HF checkpoint cut short': (
        lambda tmp: {'train__init_from': 'hf:' + cut_short(hf_model(tmp), 'model.safetensors')},
        True, r'/hf/model\.safetensors is not a readable safetensors file \(SafetensorError: '),
}


def cut_short(hf, name):
  """Leave the first half of the file `name` in an HF model dir (a download cut short)."""
  path = os.path.join(hf, name)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  return hf


def config_only(hf):
  """Leave an HF model dir with its config.json and tokenizer but no weights."""
  for f in os.listdir(hf):
    if f.endswith('.safetensors'):
      os.remove(os.path.join(hf, f))
  return hf


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_is_named_and_the_workdir_kept(name, finished_run, tmp_path, monkeypatch):
  overrides, fresh, expected = CASES[name]
  wd = str(tmp_path / 'run')
  if not fresh:
    shutil.copytree(finished_run, wd)
  before = snapshot(wd) if not fresh else {}
  overrides = overrides(tmp_path) if callable(overrides) else overrides
  argv = small_argv(wd, **(overrides or {}))
  if overrides is None:
    argv[0] = '--config=configs/demo.py:nope'
  message = cli_error(argv, monkeypatch)
  assert len(message.strip().splitlines()) <= 25, message  # A list of differences at most.
  assert re.search(expected, message, re.S), message
  if fresh == 'drawn':
    assert os.listdir(os.path.join(wd, 'checkpoints')) == []
  elif fresh:
    assert not os.path.exists(os.path.join(wd, 'config.json'))
  else:
    assert snapshot(wd) == before


def test_a_workdir_without_its_config_is_still_checked_by_its_checkpoint(finished_run, tmp_path,
                                                                         monkeypatch):
  """With config.json gone (nothing to compare the rerun with), the checkpoint's own layout
  still refuses an optimizer it does not fit."""
  wd = str(tmp_path / 'run')
  shutil.copytree(finished_run, wd)
  os.remove(os.path.join(wd, 'config.json'))
  before = snapshot(wd)
  message = cli_error(small_argv(wd, optim__clip_norm=0.0), monkeypatch)
  assert re.search(r'checkpoint .*/checkpoints/2 could not be restored: its optimizer state '
                   r'does not fit this '
                   r'config\'s optimizer \(was optim\.clip_norm or train\.trainable changed',
                   message), message
  assert snapshot(wd) == before
