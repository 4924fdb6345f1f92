"""KV-cache decoding against full-forward decoding and transformers' generate(); the generate and
evaluate command lines; summary.json."""
import gzip
import json
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import small_argv, snapshot
from jaxft import config as config_lib, convert, data, evaluate, generate, sharding, train
from test_convert import hf_dir

PROMPTS = ['12+34=', '7-', 'hello there, ', '9']


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """A random tiny HF GPT-2 (byte tokenizer) imported as a jaxft workdir: (hf dir, workdir)."""
  tmp = tmp_path_factory.mktemp('gen')
  src = hf_dir(tmp / 'hf')
  convert.import_hf(src, str(tmp / 'run'))
  return src, str(tmp / 'run')


def decode(workdir, devices, max_new=8, **sampling):
  """KV-cache and full-forward decodes of PROMPTS on a mesh over `devices`."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}),
                            devices)
  cfg, tok, _, graphdef, params = evaluate.load(workdir, mesh=mesh)
  tokens, lengths = generate.pad_prompts([tok.encode(p) for p in PROMPTS], tok.pad_id, len(devices))
  batch = sharding.shard_batch({'tokens': tokens, 'lengths': lengths}, mesh)
  cached = generate.make_generate(graphdef, tok.eos_id, max_new, **sampling)(
      params, batch['tokens'], batch['lengths'], jax.random.split(jax.random.key(0), len(tokens)))
  buf = np.full((len(tokens), tokens.shape[1] + max_new), tok.pad_id, np.int32)
  buf[:, :tokens.shape[1]] = tokens
  with sharding.activate(mesh):
    full = jax.jit(lambda p, t, n: evaluate.greedy(nnx.merge(graphdef, p), t, n, max_new))(
        params, sharding.shard_batch({'t': buf}, mesh)['t'], batch['lengths'])
  return tok, np.asarray(cached)[:len(PROMPTS)], np.asarray(full)[:len(PROMPTS)]


def until_eos(ids, eos):
  ids = list(ids)
  return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize('num_devices', [1, 8])
def test_kv_cache_decoding_equals_full_forward(imported, num_devices):
  tok, cached, full = decode(imported[1], jax.devices()[:num_devices])
  for a, b in zip(cached, full):
    assert until_eos(a, tok.eos_id) == until_eos(b, tok.eos_id)
  assert len(set(map(tuple, cached))) > 1  # Different prompts, different continuations.


def test_greedy_equals_transformers_generate(imported):
  src, workdir = imported
  tok, cached, _ = decode(workdir, jax.devices()[:1], max_new=10)
  import transformers
  hf = transformers.GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
  for prompt, ours in zip(PROMPTS, cached):
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
      theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=10, pad_token_id=257)[0, ids.shape[1]:].tolist()
    assert until_eos(ours, tok.eos_id) == until_eos(theirs, tok.eos_id), prompt


def test_sampling_settings(imported):
  workdir = imported[1]
  tok, greedy, _ = decode(workdir, jax.devices()[:1])
  _, top1, _ = decode(workdir, jax.devices()[:1], temperature=1.0, top_k=1)
  _, nucleus0, _ = decode(workdir, jax.devices()[:1], temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(top1, greedy)  # top_k=1 and a vanishing top_p are greedy.
  np.testing.assert_array_equal(nucleus0, greedy)
  _, hot, _ = decode(workdir, jax.devices()[:1], temperature=5.0)
  assert not np.array_equal(hot, greedy)
  logits = jax.numpy.log(jax.numpy.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(generate.sample(logits, jax.random.key(s)[None], 1.0, 0, 0.7)[0]) for s in range(200)}
  assert draws == {0, 1}  # top_p 0.7 keeps the tokens whose preceding mass is below 0.7.


def test_generate_and_evaluate_command_lines(tmp_path, capsys):
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, objective='labeled_pair', train__steps=4, train__eval_every=4,
                        train__exact_match_examples=16))
  summary = json.load(open(os.path.join(wd, 'summary.json')))
  assert summary['steps'] == 4 and summary['objective'] == 'labeled_pair'
  assert 0 < summary['supervised_tokens'] < summary['tokens']
  assert set(summary['test']) >= {'loss', 'perplexity', 'exact_match'}
  final = json.load(open(os.path.join(wd, 'eval', 'test_4.json')))['metrics']
  os.remove(os.path.join(wd, 'eval', 'test_4.json'))
  evaluate.main(['--workdir', wd, '--split', 'test'])
  again = json.load(open(os.path.join(wd, 'eval', 'test_4.json')))
  assert again['metrics'] == pytest.approx(final) and 'constant_exact_match' in again['baselines']
  assert 'labeled_pair on test at step 4' in capsys.readouterr().out
  evaluate.main(['--workdir', wd, '--split', 'train'])  # Exact match on train records too.
  assert json.load(open(os.path.join(wd, 'eval', 'train_4.json')))['metrics'][
      'exact_match_examples'] == 16
  with pytest.raises(FileNotFoundError, match=r'no jaxft checkpoint at .*/checkpoints/3 \(that '
                     r'directory has steps 4\)'):
    evaluate.main(['--workdir', wd, '--step', '3'])
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prompt": "1+1="}\n{"prompt": "30-4="}\n{"prompt": "5+"}\n')
  out = tmp_path / 'out.jsonl'
  generate.main(['--workdir', wd, '--prompts-file', str(prompts), '--out', str(out),
                 '--num-samples', '2', '--temperature', '0.7', '--max-new-tokens', '5'])
  lines = [json.loads(l) for l in open(out)]
  assert [(l['prompt'], l['sample']) for l in lines] == [
      ('1+1=', 0), ('1+1=', 1), ('30-4=', 0), ('30-4=', 1), ('5+', 0), ('5+', 1)]
  assert all(len(l['completion']) <= 5 for l in lines)  # At most one character per byte token.
  # The same samples in batches of 4 rows (2 calls) on a mesh of 4 data shards, and of 1 (each
  # call rounded up to the 8 shards of the default mesh), as in one call of all 6 rows.
  for argv in (['--batch-size', '4', '--config.mesh.tensor=2'], ['--batch-size', '1']):
    again = tmp_path / 'again.jsonl'
    generate.main(['--workdir', wd, '--prompts-file', str(prompts), '--out', str(again),
                   '--num-samples', '2', '--temperature', '0.7', '--max-new-tokens', '5', *argv])
    assert [json.loads(l) for l in open(again)] == lines, argv
  # A .gz --out is gzip'ed (it was plain text under that name), as .jsonl.gz data files are.
  generate.main(['--workdir', wd, '--prompts-file', str(prompts), '--out', f'{out}.gz',
                 '--num-samples', '2', '--temperature', '0.7', '--max-new-tokens', '5'])
  assert [json.loads(l) for l in gzip.open(f'{out}.gz', 'rt')] == lines
  assert len({l['completion'] for l in lines}) > 1
  with pytest.raises(config_lib.ConfigError, match=r'\+ --max-new-tokens 61 > model max_len 64'):
    generate.main(['--workdir', wd, '--prompt', '1+1=', '--max-new-tokens', '61'])
  with pytest.raises(config_lib.ConfigError, match=r'out of range: --temperature -1.0 \(must be '
                     r'finite, >= 0 \(0: greedy\)\); --top-p 0.0 \(must be in \(0, 1\]\)'):
    generate.main(['--workdir', wd, '--prompt', '1', '--temperature=-1', '--top-p', '0'])
  with pytest.raises(config_lib.ConfigError, match=r'^--top-k, --num-samples: sampling options, '
                     r'but --temperature 0 \(the default\) decodes greedily'):
    generate.main(['--workdir', wd, '--prompt', '1', '--top-k', '5', '--num-samples', '2'])
  with pytest.raises(config_lib.ConfigError, match=r"--top-k 300 > the tokenizer's 258 ids"):
    generate.main(['--workdir', wd, '--prompt', '1', '--temperature=1', '--top-k', '300'])
  prompts.write_text('{"prompt": "1+1="}\n{"prompt": 12}\n')
  with pytest.raises(data.DataError, match=rf"{prompts}:2: field 'prompt' must be a string, got int"):
    generate.main(['--workdir', wd, '--prompts-file', str(prompts)])
  # On another mesh than the run's (a run from more devices needs one): the same greedy text.
  capsys.readouterr()
  for mesh in ([], ['--config.mesh.tensor=2']):
    generate.main(['--workdir', wd, '--max-new-tokens', '5', '--prompt', '2+2='] + mesh)
  eight, two = capsys.readouterr().out.splitlines()
  assert eight == two
  with pytest.raises(data.DataError, match=r"data.seq_len=100 > the model's 64 positions"):
    evaluate.main(['--workdir', wd, '--config.data.seq_len=100'])
  # A pair run's prompts go through its data.prompt_template, as in training; --raw does not.
  cfg_path = os.path.join(wd, 'config.json')
  cfg = json.load(open(cfg_path))
  cfg['data']['prompt_template'] = 'Q: {prompt} A: '
  json.dump(cfg, open(cfg_path, 'w'))
  capsys.readouterr()
  for argv in (['--prompt', '1+1='], ['--prompt', 'Q: 1+1= A: ', '--raw'], ['--prompt', '1+1=', '--raw']):
    generate.main(['--workdir', wd, '--max-new-tokens', '5'] + argv)
  templated, by_hand, raw = capsys.readouterr().out.splitlines()
  assert templated == by_hand and templated.startswith('Q: 1+1= A: ') and raw.startswith('1+1=')
  cfg['objective'] = 'classification'
  json.dump(cfg, open(cfg_path, 'w'))
  with pytest.raises(config_lib.ConfigError, match=r'is a classification run: its outputs are '
                     r'class scores \(python -m jaxft.evaluate\), not text'):
    generate.main(['--workdir', wd, '--prompt', '1+1='])


def test_generate_names_bad_prompts_and_keeps_its_files(imported, tmp_path, monkeypatch):
  """Prompts too long for the model's positions, or not text, are named (file:line, or --prompt);
  an --out that is the prompts file or a directory, or an infinite temperature, is refused before
  any decoding, the prompts left as they were; --out=~/x (no shell expands that ~) is in $HOME."""
  wd = imported[1]
  with pytest.raises(config_lib.ConfigError, match=r"^--raw skips a labeled_pair run's "
                     r"data\.prompt_template; .* is a next_token run"):  # (It did nothing.)
    generate.main(['--workdir', wd, '--prompt', '1', '--raw'])
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prompt": "1+1="}\n\n{"prompt": "%s"}\n{"prompt": "%s"}\n'
                     % ('x' * 60, 'y' * 70))
  with pytest.raises(config_lib.ConfigError, match=rf'^{re.escape(str(prompts))}:3: prompt of 60 '
                     r'tokens \+ --max-new-tokens 8 > model max_len 64 \(and 1 more over the '
                     r'limit\)$'):
    generate.main(['--workdir', wd, '--prompts-file', str(prompts), '--max-new-tokens', '8'])
  with pytest.raises(config_lib.ConfigError, match=r'^--prompt: prompt of 70 tokens \+ '
                     r'--max-new-tokens 1 > model max_len 64$'):
    generate.main(['--workdir', wd, '--prompt', 'y' * 70, '--max-new-tokens', '1'])
  # An argument of bytes that are not UTF-8 (Python reads them as lone surrogates): named, where
  # the tokenizer's encode raised UnicodeEncodeError with a traceback.
  with pytest.raises(data.DataError, match=r"^--prompt: field 'prompt': lone UTF-16 surrogate "
                     r"U\+DCFF at character 2"):
    generate.main(['--workdir', wd, '--prompt', 'ab\udcff'])
  before = prompts.read_bytes()
  monkeypatch.chdir(tmp_path)
  for out in (str(prompts), 'p.jsonl', str(tmp_path / 'sub' / '..' / 'p.jsonl')):
    with pytest.raises(FileExistsError, match=rf'^--out {re.escape(out)} is the --prompts-file: '
                       r'writing it would replace the prompts$'):
      generate.main(['--workdir', wd, '--prompts-file', str(prompts), f'--out={out}'])
  assert prompts.read_bytes() == before
  with pytest.raises(IsADirectoryError, match=rf'^--out {re.escape(str(tmp_path))} is a directory'):
    generate.main(['--workdir', wd, '--prompts-file', str(prompts), '--out', str(tmp_path)])
  with pytest.raises(config_lib.ConfigError, match=r'--temperature inf \(must be finite'):
    generate.main(['--workdir', wd, '--prompt', '1', '--temperature', 'inf'])
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  generate.main(['--workdir', wd, '--prompt', '1+1=', '--max-new-tokens', '3', '--out=~/o.jsonl'])
  assert not (tmp_path / '~').exists()
  [line] = [json.loads(l) for l in open(tmp_path / 'home' / 'o.jsonl')]
  assert line['prompt'] == '1+1=' and line['sample'] == 0 and len(line['completion']) <= 3


def test_evaluate_of_a_checkpoint_dir_reports_into_the_workdir(imported, tmp_path, capsys):
  """--workdir may name a run's checkpoints/ dir or one step in it: the report goes to the run's
  eval/, never into the checkpoint (where orbax's clean-up would delete it with the step)."""
  run = tmp_path / 'run'
  shutil.copytree(imported[1], run)
  before = snapshot(run / 'checkpoints')
  data_args = ['--config.data.source=demo', '--config.data.demo.num_examples=200',
               '--config.data.seq_len=32']
  reports = []
  for argv in (['--workdir', str(run / 'checkpoints' / '0')],
               ['--workdir', str(run / 'checkpoints'), '--step', '0']):
    evaluate.main(argv + ['--split', 'val'] + data_args)
    path = re.search(r'wrote (\S+)', capsys.readouterr().out).group(1)
    assert os.path.dirname(path) == str(run / 'eval'), path
    reports.append(json.load(open(path)))
  assert reports[0] == reports[1] and reports[0]['step'] == 0 and reports[0]['metrics']['loss'] > 0
  assert snapshot(run / 'checkpoints') == before
