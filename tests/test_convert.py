"""Hugging Face interop on tiny local checkpoints: round trips, logits against transformers,
pipelines on exported runs, tokenizers, and the errors for what does not fit. No downloads."""
import json
import os
import re
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import small_argv, small_config, snapshot
from jaxft import checkpoint, cli, convert, data, evaluate, model as model_lib, objectives, sharding, \
    tokenizer, train
from jaxft.config import ConfigError

TINY = dict(vocab_size=258, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=256,
            eos_token_id=256, pad_token_id=257)


def hf_dir(path, num_labels=0, **overrides):
  """A random tiny HF GPT-2 (LM or classifier) with the byte tokenizer, saved to `path`."""
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(**{**TINY, **overrides})
  if num_labels:
    cfg.num_labels = num_labels
    cfg.id2label = {i: f'c{i}' for i in range(num_labels)}
    cfg.label2id = {f'c{i}': i for i in range(num_labels)}
    model = transformers.GPT2ForSequenceClassification(cfg)
  else:
    model = transformers.GPT2LMHeadModel(cfg)
  with torch.no_grad():  # Non-zero biases and LayerNorms, so every tensor's layout matters.
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.save_pretrained(path)
  tokenizer.byte_tokenizer_as_hf().save_pretrained(path)
  return str(path)


def run_model(workdir):
  """(config, tokenizer, GPT) of a jaxft run's newest checkpoint, on one device."""
  cfg, directory, step = checkpoint.run_config(workdir)
  tok = tokenizer.build(cfg.tokenizer)
  model_cfg = objectives.model_config(cfg, tok)
  values = convert.read_params(os.path.join(directory, str(step), 'params'),
                               [r[0] for r in convert.table(model_cfg)])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, abstract = convert.abstract_model(model_cfg, mesh)
  return cfg, tok, nnx.merge(graphdef, model_lib.map_with_path(
      lambda p, _: jnp.asarray(values[p]), abstract))


def tensors(directory):
  out = {}
  for f in sorted(os.listdir(directory)):
    if f.endswith('.safetensors'):
      out.update(load_file(os.path.join(directory, f)))
  return out


@pytest.mark.parametrize('num_labels', [0, 3])
def test_hf_to_jaxft_to_hf_round_trip_is_identical(tmp_path, num_labels):
  # A LayerNorm epsilon other than GPT-2's: it must travel with the weights, both ways.
  src = hf_dir(tmp_path / 'src', num_labels, layer_norm_epsilon=1e-3)
  report = convert.import_hf(src, str(tmp_path / 'jaxft'))
  assert len(report['loaded']) == 28 + bool(num_labels) and report['ignored'] == []
  assert json.load(open(tmp_path / 'jaxft' / 'config.json'))['model']['ln_eps'] == 1e-3
  # Small shards: the export streams several files plus an index, and verifies against torch.
  diff = convert.export(str(tmp_path / 'jaxft'), str(tmp_path / 'back'), shard_bytes=40_000)
  assert diff < 1e-4
  shards = [f for f in os.listdir(tmp_path / 'back') if f.endswith('.safetensors')]
  assert len(shards) > 1 and os.path.isfile(tmp_path / 'back' / 'model.safetensors.index.json')
  a, b = tensors(src), tensors(tmp_path / 'back')
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  back = json.load(open(tmp_path / 'back' / 'config.json'))
  assert back['architectures'] == ['GPT2ForSequenceClassification' if num_labels else 'GPT2LMHeadModel']
  assert back['layer_norm_epsilon'] == 1e-3
  if num_labels:
    assert back['id2label'] == {'0': 'c0', '1': 'c1', '2': 'c2'} and back['pad_token_id'] == 257


def test_a_classifier_of_few_positions_exports_and_passes_its_check(tmp_path):
  """The export check's padded batch fits a model of 6 positions: its row of L - 7 tokens was
  empty, and a right export failed the check."""
  src = hf_dir(tmp_path / 'src', 3, n_positions=6)
  convert.import_hf(src, str(tmp_path / 'run'))
  assert convert.export(str(tmp_path / 'run'), str(tmp_path / 'back')) < 1e-4
  a, b = tensors(src), tensors(tmp_path / 'back')
  assert sorted(a) == sorted(b) and b['transformer.wpe.weight'].shape == (6, 32)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('activation', ['gelu_fast', 'gelu_pytorch_tanh'])
def test_hf_tanh_gelus_load_as_jaxfts_gelu(tmp_path, activation):
  """transformers' other names for the tanh GELU (gelu_fast: its constant written out) give the
  logits transformers computes with them."""
  src = hf_dir(tmp_path / 'src', activation_function=activation)
  convert.import_hf(src, str(tmp_path / 'run'))
  _, _, model = run_model(str(tmp_path / 'run'))
  tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
  hf = transformers.GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(model.logits(model.hidden(jnp.asarray(tokens, jnp.int32))))[..., :258]
  np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_byte_tokenizer_as_hf_encodes_identically(tmp_path):
  tokenizer.byte_tokenizer_as_hf().save_pretrained(tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = tokenizer.ByteTokenizer()
  rng = np.random.default_rng(0)
  texts = ['23+58=81', ' two  spaces\n\ttab', 'héllo wörld ✓ 日本語 🙂', '']
  texts += ['quoting <|endoftext|> and <|pad|> as text']  # Bytes, not the special ids.
  texts += [''.join(chr(c) for c in rng.integers(32, 0x3000, 40)) for _ in range(20)]
  for t in texts:
    assert hf(t, add_special_tokens=False)['input_ids'] == ours.encode(t), t
    assert hf.decode(ours.encode(t)) == t
  assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (256, 257, 258)


def test_export_check_catches_a_wrong_tensor(tmp_path, monkeypatch):
  src = hf_dir(tmp_path / 'src')
  convert.import_hf(src, str(tmp_path / 'jaxft'))
  out = str(tmp_path / 'out')
  assert convert.export(str(tmp_path / 'jaxft'), out, verify=False) is None
  t = tensors(out)
  t['transformer.h.1.mlp.c_fc.bias'] = t['transformer.h.1.mlp.c_fc.bias'] + 1e-2
  save_file(t, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  cfg, directory, step = checkpoint.run_config(str(tmp_path / 'jaxft'))
  tok = tokenizer.build(cfg.tokenizer)
  model_cfg = objectives.model_config(cfg, tok)
  with pytest.raises(checkpoint.CheckpointMismatch, match=r'transformers logits differ from jaxft '
                                                           r'by [0-9.e-]+ > 0.0001 x the largest'):
    convert.verify_export(out, os.path.join(directory, str(step), 'params'), model_cfg, tok)
  # An export that fails its check is not left in --out: what was there stays.
  before, hf_config = snapshot(out), convert.hf_config

  def wrong_eps(*args):
    c = hf_config(*args)
    c.layer_norm_epsilon = 0.1
    return c
  monkeypatch.setattr(convert, 'hf_config', wrong_eps)
  with pytest.raises(checkpoint.CheckpointMismatch, match=rf'-> {out}: transformers logits differ '
                     rf'.* the export is wrong \({out} left as it was\)'):
    convert.export(str(tmp_path / 'jaxft'), out)
  assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ['jaxft', 'out', 'src']
  monkeypatch.undo()
  # Logits in the hundreds (a trained model's can be): float32 rounds them by about 1e-4, and a
  # right export still passes (the tolerance is relative to the largest logit).
  big = hf_dir(tmp_path / 'big')
  model = transformers.GPT2LMHeadModel.from_pretrained(big)
  with torch.no_grad():
    model.transformer.wte.weight.mul_(30)
    model.transformer.ln_f.weight.fill_(30)
  model.save_pretrained(big)
  convert.import_hf(big, str(tmp_path / 'big_jaxft'))
  assert convert.export(str(tmp_path / 'big_jaxft'), str(tmp_path / 'big_out')) < 1e-2


def test_unsupported_and_mismatched_checkpoints_are_named(tmp_path):
  bad = hf_dir(tmp_path / 'relu', activation_function='relu', scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"unsupported config: "
                     r"scale_attn_by_inverse_layer_idx=True .*activation_function='relu'"):
    convert.import_hf(bad, str(tmp_path / 'x'))
  src = hf_dir(tmp_path / 'src')
  os.remove(os.path.join(src, 'model.safetensors'))
  torch.save({}, os.path.join(src, 'pytorch_model.bin'))
  with pytest.raises(FileNotFoundError, match=r'no model.safetensors.*pytorch_model.bin.*'
                                              r'safetensors only \(no pickle\)'):
    convert.import_hf(src, str(tmp_path / 'y'))
  with pytest.raises(FileNotFoundError, match='no config.json'):
    convert.import_hf(str(tmp_path), str(tmp_path / 'z'))
  # Weights of a block its config.json does not describe (n_layer=1 over 2 layers' tensors).
  two = hf_dir(tmp_path / 'two')
  hf_cfg = json.load(open(os.path.join(two, 'config.json')))
  json.dump({**hf_cfg, 'n_layer': 1}, open(os.path.join(two, 'config.json'), 'w'))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r'(?s)12 differences.*'
                     r'transformer\.h\.1\.attn\.c_attn\.bias: not in the model \(config.json has '
                     r'n_layer=1\)'):
    convert.import_hf(two, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')
  # init_from=hf: into a run whose model differs lists every differing field.
  good = hf_dir(tmp_path / 'good')
  with pytest.raises(checkpoint.CheckpointMismatch, match=r'(?s)2 differences.*num_layers: run 3 '
                     r'vs checkpoint 2.*mlp_dim: run 64 vs checkpoint 128'):
    train.main(small_argv(str(tmp_path / 'run'), train__init_from=f'hf:{good}',
                          model__num_layers=3, model__mlp_dim=64))


def test_hf_configs_are_read_as_transformers_reads_them(tmp_path):
  """What config.json says beyond the shapes either carries over or is refused by name: the
  classifier's loss and pad id, the end-of-text id, a head without `architectures`, HF's
  aliases; nothing of it is dropped without a word."""
  def edited(name, num_labels=0, **changes):
    path = hf_dir(tmp_path / name, num_labels)
    c = json.load(open(os.path.join(path, 'config.json')))
    json.dump({k: v for k, v in {**c, **changes}.items() if v is not None},
              open(os.path.join(path, 'config.json'), 'w'))
    return path
  for name, labels, changes, message in [
      ('multi', 3, dict(problem_type='multi_label_classification'),
       r"problem_type='multi_label_classification' \(jaxft: single_label_classification"),
      ('regression', 1, {}, r'num_labels=1 \(a regression head'),
      ('eos', 0, dict(eos_token_id=10), r'eos_token_id=10 but tokenizer hf:.*eos ends text with 256'),
      ('pad', 3, dict(pad_token_id=256), r'pad_token_id=256 but tokenizer hf:.*pad pads with 257')]:
    with pytest.raises(checkpoint.CheckpointMismatch, match=message):
      convert.import_hf(edited(name, labels, **changes), str(tmp_path / f'{name}_run'))
    assert not os.path.exists(tmp_path / f'{name}_run')
  # The same checks on init_from=hf: (the run's tokenizer pads with 257).
  with pytest.raises(checkpoint.CheckpointMismatch, match=r'init_from hf:.*does not match the run: '
                     r'pad_token_id=256 but tokenizer bytes pads with 257'):
    train.main(small_argv(str(tmp_path / 'ft'), objective='classification', train__steps=1,
                          train__init_from=f'hf:{tmp_path / "pad"}'))
  # HF's alias names and a classifier without `architectures` load as transformers loads them.
  src = hf_dir(tmp_path / 'src', 3)
  aliased = edited('aliased', 3, architectures=None, n_embd=None, n_layer=None, n_head=None,
                   hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
  for path, run in ((src, 'a'), (aliased, 'b')):
    report = convert.import_hf(path, str(tmp_path / run))
    assert len(report['loaded']) == 29 and report['ignored'] == []
  a, b = (json.load(open(tmp_path / run / 'config.json')) for run in 'ab')
  assert a['objective'] == b['objective'] == 'classification'
  assert (a['model'], a['data']) == (b['model'], b['data'])
  # Back to HF: the loss, dropout and the tokenizer's length travel with it.
  convert.export(str(tmp_path / 'b'), str(tmp_path / 'b_hf'))
  back = json.load(open(tmp_path / 'b_hf' / 'config.json'))
  assert back['problem_type'] == 'single_label_classification' and len(back['id2label']) == 3
  assert back['resid_pdrop'] == back['attn_pdrop'] == back['embd_pdrop'] == 0.1
  exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'b_hf'))
  assert (exported.model_max_length, exported.truncation_side) == (64, 'left')  # As trained.


def test_imports_refuse_what_would_load_wrong_and_keep_what_is_saved(tmp_path, monkeypatch):
  src = hf_dir(tmp_path / 'src', layer_norm_epsilon=1e-3)
  run = str(tmp_path / 'run')
  convert.import_hf(src, run)
  before = snapshot(run)
  # A second import into the same workdir: refused, the first one's files untouched.
  other = hf_dir(tmp_path / 'other', n_embd=64)
  with pytest.raises(FileExistsError, match=r'run already holds a jaxft run.*another --out'):
    convert.import_hf(other, run)
  # From the command line: one error line, no traceback.
  monkeypatch.setattr(sys, 'argv', ['jaxft.convert', 'from-hf', '--model', other, '--out', run])
  with pytest.raises(SystemExit, match=r'^error: .*run already holds a jaxft run'):
    cli.run(convert.main)
  assert snapshot(run) == before
  # An import cut short (killed while orbax wrote step 0; config.json comes last) is begun anew,
  # but a workdir with a finished checkpoint and no config.json is still refused.
  cut = tmp_path / 'cut'
  (cut / 'checkpoints' / '0.orbax-checkpoint-tmp-1765000000').mkdir(parents=True)
  convert.import_hf(src, str(cut))
  assert sorted(os.listdir(cut / 'checkpoints')) == ['0'] and (cut / 'config.json').is_file()
  os.remove(cut / 'config.json')
  with pytest.raises(FileExistsError, match=r'cut already holds a jaxft run'):
    convert.import_hf(src, str(cut))
  # A config whose vocab is not its tokenizer's: the padded rows would be masked (or invented).
  wide = hf_dir(tmp_path / 'wide', vocab_size=300)
  with pytest.raises(checkpoint.CheckpointMismatch, match=r'wide/config.json: vocab_size=300 but '
                     r'tokenizer hf:.*wide has 258 ids'):
    convert.import_hf(wide, str(tmp_path / 'x'))
  # No tokenizer files: named, and --tokenizer supplies one.
  bare = hf_dir(tmp_path / 'bare')
  for f in os.listdir(bare):
    if 'token' in f or f in ('vocab.json', 'merges.txt'):
      os.remove(os.path.join(bare, f))
  with pytest.raises(FileNotFoundError, match=r'bare: no tokenizer files there'):
    convert.import_hf(bare, str(tmp_path / 'y'))
  convert.main(['from-hf', '--model', bare, '--out', str(tmp_path / 'y'), '--tokenizer', 'bytes'])
  # A class name with a comma: data.label_names could not hold it.
  commas = hf_dir(tmp_path / 'commas', num_labels=2)
  hf_cfg = json.load(open(os.path.join(commas, 'config.json')))
  hf_cfg['id2label'] = {'0': 'bad, really', '1': 'good'}
  json.dump(hf_cfg, open(os.path.join(commas, 'config.json'), 'w'))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"commas/config.json: label 'bad, "
                     r"really' \(id2label\) has a comma"):
    convert.import_hf(commas, str(tmp_path / 'z'))
  assert not os.path.exists(tmp_path / 'z')
  assert convert.export(str(tmp_path / 'y'), str(tmp_path / 'y_hf')) < 1e-4
  # A run whose LayerNorm epsilon differs from the jaxft source's is refused; set, it trains.
  with pytest.raises(checkpoint.CheckpointMismatch,
                     match=r'does not match the run: model.ln_eps: run 1e-05 vs source 0.001'):
    train.main(small_argv(str(tmp_path / 'ft'), train__init_from=run, train__steps=1))
  train.main(small_argv(str(tmp_path / 'ft'), train__init_from=run, train__steps=1,
                        model__ln_eps=1e-3))


def test_an_imported_model_records_a_whole_config_and_evaluates_on_given_data(tmp_path, capsys):
  from jaxft import config as config_lib
  run = str(tmp_path / 'run')
  convert.import_hf(hf_dir(tmp_path / 'src'), run)
  saved = json.load(open(os.path.join(run, 'config.json')))
  assert config_lib.differences(saved, config_lib.load_file(config_lib.COMMON)) == [
      ('data.seq_len', 64, 128),  # Within the model's positions.
      ('model.dropout', 0.1, 0.0),  # The checkpoint's (GPT2Config's default), for to-hf.
      ('model.embed_dim', 32, None), ('model.max_len', 64, None), ('model.mlp_dim', 128, None),
      ('model.num_heads', 4, None), ('model.num_layers', 2, None), ('model.size', 'gpt2', 'tiny'),
      ('tokenizer', f'hf:{tmp_path / "src"}', 'bytes')]
  # Its config names no data; evaluation is told which, and reports apart from the run's own.
  evaluate.main(['--workdir', run, '--split', 'val', '--config.data.source', 'demo',
                 '--config.data.demo.num_examples=300', '--config.data.seq_len=32'])
  out = capsys.readouterr().out
  report_path = re.search(r'wrote (\S+/eval/val_[0-9a-f]{8}_0\.json)', out).group(1)
  report = json.load(open(report_path))
  assert report['overrides'] == {'data.source': 'demo', 'data.demo.num_examples': '300',
                                 'data.seq_len': '32'}
  assert report['metrics']['loss'] > 0 and report['metrics']['supervised_tokens'] > 0
  with pytest.raises(config_lib.ConfigError, match=r"--config\.model\.num_layers: evaluation "
                     r"takes only data\., .*the model is the checkpoint's"):
    evaluate.main(['--workdir', run, '--config.model.num_layers=3'])
  # Or the data comes with the import: the rest of a config file's keys, the model the checkpoint's.
  convert.main(['from-hf', '--model', str(tmp_path / 'src'), '--out', str(tmp_path / 'demo'),
                '--config', 'configs/demo.py:labeled_pair'])
  demo = json.load(open(tmp_path / 'demo' / 'config.json'))
  assert (demo['objective'], demo['data']['source'], demo['model']['num_layers']) == (
      'labeled_pair', 'demo', 2)
  assert demo['data']['seq_len'] == 64  # The demo's 128, cut to the model's positions.


def test_export_replaces_an_earlier_export_and_spares_workdirs(tmp_path):
  convert.import_hf(hf_dir(tmp_path / 'src'), str(tmp_path / 'run'))
  out = tmp_path / 'hf'
  convert.export(str(tmp_path / 'run'), str(out), verify=False)
  (out / 'model.safetensors').write_bytes(b'stale')  # Not these weights: must not survive.
  # Sharded into the same directory: the single file would shadow the shards.
  assert convert.export(str(tmp_path / 'run'), str(out), shard_bytes=40_000) < 1e-4
  assert 'model.safetensors' not in os.listdir(out)
  # And back to one file: the shards and their index go.
  assert convert.export(str(tmp_path / 'run'), str(out)) < 1e-4
  assert sorted(f for f in os.listdir(out) if f.startswith('model')) == ['model.safetensors']
  # Another tokenizer's files there (an HF model dir saved by an older transformers): its added
  # and special tokens would be read into the export's tokenizer (ids past the model's vocab).
  json.dump({'<pad>': 258, '<sep>': 259}, open(out / 'added_tokens.json', 'w'))
  json.dump({'pad_token': '<pad>', 'eos_token': '<sep>'}, open(out / 'special_tokens_map.json', 'w'))
  (out / 'chat_template.jinja').write_text('{{ messages }}')
  (out / 'README.md').write_text('kept')  # Not read by transformers: the user's.
  assert convert.export(str(tmp_path / 'run'), str(out)) < 1e-4
  exported = transformers.AutoTokenizer.from_pretrained(str(out))
  assert (len(exported), exported.eos_token_id, exported.pad_token_id) == (258, 256, 257)
  assert exported('23+58=', add_special_tokens=False)['input_ids'] == list(b'23+58=')
  assert exported.chat_template is None and (out / 'README.md').read_text() == 'kept'
  before = snapshot(tmp_path / 'run')
  with pytest.raises(FileExistsError, match=r'run is a jaxft workdir'):
    convert.export(str(tmp_path / 'run'), str(tmp_path / 'run'))
  assert snapshot(tmp_path / 'run') == before
  # A bf16-compute run's params are float32: its export is checked in float32 like any other.
  cfg_path = tmp_path / 'run' / 'config.json'
  cfg_path.write_text(cfg_path.read_text().replace('"dtype": "float32"', '"dtype": "bfloat16"'))
  assert json.loads(cfg_path.read_text())['model']['dtype'] == 'bfloat16'
  assert convert.export(str(tmp_path / 'run'), str(out)) < 1e-4


def test_damaged_hf_files_are_named_and_nothing_is_written(tmp_path, monkeypatch):
  """A download cut short or a file edited wrong: from-hf names the file and what is wrong with
  it (one error line, no traceback) and writes nothing."""
  src = hf_dir(tmp_path / 'src')
  convert.import_hf(src, str(tmp_path / 'run'))
  sharded = str(tmp_path / 'sharded')
  convert.export(str(tmp_path / 'run'), sharded, verify=False, shard_bytes=40_000)
  shard = sorted(f for f in os.listdir(sharded) if f.endswith('.safetensors'))[1]

  def cut(path, name, keep):
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[:keep(len(data))])

  def edit_tensors(path, change):
    t = tensors(path)
    change(t)
    save_file(t, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  cases = [
      ('cut', src, lambda p: cut(p, 'model.safetensors', lambda n: n // 2),
       checkpoint.CheckpointMismatch, r'cut/model\.safetensors is not a readable safetensors '
       r'file \(SafetensorError: '),
      ('json', src, lambda p: cut(p, 'config.json', lambda n: n - 10), checkpoint.CheckpointMismatch,
       r'json/config\.json is not valid JSON: '),
      ('tensor', src, lambda p: edit_tensors(p, lambda t: t.pop('transformer.h.1.ln_2.bias')),
       checkpoint.CheckpointMismatch, r'missing in checkpoint: transformer\.h\.1\.ln_2\.bias '
       r'\(32,\) \(none of model\.safetensors has it\)'),
      ('shape', src, lambda p: edit_tensors(p, lambda t: t.update(
          {'transformer.wpe.weight': t['transformer.wpe.weight'][:32]})),
       checkpoint.CheckpointMismatch, r'transformer\.wpe\.weight: checkpoint \(32, 32\) \(in '
       r'model\.safetensors\) vs model \(64, 32\)'),
      ('index', sharded, lambda p: (p / 'model.safetensors.index.json').write_text('{}'),
       checkpoint.CheckpointMismatch, r'index/model\.safetensors\.index\.json: not a safetensors '
       r"index .*KeyError\('weight_map'\)"),
      ('shard', sharded, lambda p: os.remove(p / shard), FileNotFoundError,
       rf'shard/{shard}: no such file \(listed in .*shard/model\.safetensors\.index\.json\)'),
      ('tokenizer', src, lambda p: cut(p, 'tokenizer.json', lambda n: n // 2), ConfigError,
       r'tokenizer=hf:.*tokenizer could not be loaded \(JSONDecodeError: ')]
  for name, origin, damage, error, message in cases:
    path = tmp_path / name
    shutil.copytree(origin, path)
    damage(path)
    with pytest.raises(error, match=message):
      convert.import_hf(str(path), str(tmp_path / f'{name}_run'))
    assert not os.path.exists(tmp_path / f'{name}_run'), name
  monkeypatch.setattr(sys, 'argv', ['jaxft.convert', 'from-hf', '--model', str(tmp_path / 'cut'),
                                    '--out', str(tmp_path / 'cut_run')])
  with pytest.raises(SystemExit, match=r'^error: .*cut/model\.safetensors is not a readable'):
    cli.run(convert.main)


def test_an_out_that_is_a_file_or_a_symlink(tmp_path, monkeypatch):
  """--out that is (or lies under) a file is refused before any work, by to-hf, from-hf and
  tokenizer train (which saved nothing and said it had); a symlinked --out, here to another file
  system where there is one, is written beside its target (a rename cannot cross file systems:
  the earlier export there lost its weights)."""
  src = hf_dir(tmp_path / 'src')
  run = str(tmp_path / 'run')
  convert.import_hf(src, run)
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text(''.join(json.dumps({'text': f'the cat {i}'}) + '\n' for i in range(50)))
  afile = tmp_path / 'afile'
  afile.write_text('kept')
  before = sorted(os.listdir(tmp_path))
  for command in (lambda out: convert.export(run, out), lambda out: convert.import_hf(src, out),
                  lambda out: tokenizer.main(['train', '--input', str(corpus), '--vocab-size',
                                              '300', '--out', out])):
    for out in (afile, afile / 'sub'):
      with pytest.raises(FileExistsError, match=rf'--out {out}: {afile} is a file, not a directory'):
        command(str(out))
  assert afile.read_text() == 'kept' and sorted(os.listdir(tmp_path)) == before
  shm = '/dev/shm'  # A tmpfs: another file system than tmp_path's, where the machine has one.
  other_fs = os.path.isdir(shm) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev
  target = tempfile.mkdtemp(dir=shm if other_fs else tmp_path)
  try:
    convert.export(run, target, verify=False)
    first = tensors(target)
    link = tmp_path / 'link'
    link.symlink_to(target)
    staged, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, 'mkdtemp', lambda **kw: staged.append(kw['dir']) or mkdtemp(**kw))
    assert convert.export(run, str(link)) < 1e-4
    assert staged == [os.path.dirname(os.path.realpath(target))]
    again = tensors(target)
    assert sorted(again) == sorted(first)
    for k in first:
      np.testing.assert_array_equal(again[k], first[k], err_msg=k)
    assert sorted(os.listdir(target)) == ['config.json', 'generation_config.json',
                                          'model.safetensors', 'tokenizer.json',
                                          'tokenizer_config.json']
    assert not [f for f in os.listdir(os.path.dirname(target)) + os.listdir(tmp_path)
                if f.startswith('.')]  # No staging directory left behind.
  finally:
    shutil.rmtree(target, ignore_errors=True)


def test_a_model_dir_given_with_a_tilde(tmp_path, monkeypatch):
  """init_from=hf:~/models/x in a config (no shell expands that ~) or from-hf --model=~/models/x
  reads the directory, as tokenizer=hf:~/... does; it was taken for a missing one."""
  monkeypatch.setenv('HOME', str(tmp_path))
  src = hf_dir(tmp_path / 'models' / 'x')
  assert convert.local_dir('~/models/x') == src
  report = convert.import_hf('~/models/x', str(tmp_path / 'run'))
  assert len(report['loaded']) == 28
  assert json.load(open(tmp_path / 'run' / 'config.json'))['tokenizer'] == f'hf:{src}'
  with pytest.raises(FileNotFoundError, match=r'^~/models/y: not a Hugging Face model directory'):
    convert.local_dir('~/models/y')
  # As for tokenizers (tokenizer.is_path): a name that is no hub id is a missing directory.
  with pytest.raises(FileNotFoundError, match=r'^models/x/y: not a Hugging Face model directory'):
    convert.local_dir('models/x/y')


def test_outputs_given_with_a_tilde_are_in_the_home_directory(tmp_path, monkeypatch, capsys):
  """--out=~/x (no shell expands a ~ after '=') made a directory named '~' in the working
  directory, and the hint printed with it (init_from=~/x, tokenizer='hf:~/x') named another."""
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(cwd)
  hf_dir(home / 'models' / 'x')
  convert.main(['from-hf', '--model=~/models/x', '--out=~/imp'])
  assert f'use --config.train.init_from={home}/imp' in capsys.readouterr().out
  assert (home / 'imp' / 'config.json').is_file()
  convert.main(['to-hf', '--checkpoint=~/imp', '--out=~/hf'])
  assert (home / 'hf' / 'model.safetensors').is_file()
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text(''.join(json.dumps({'text': f'the cat {i} sat'}) + '\n' for i in range(200)))
  tokenizer.main(['train', f'--input={corpus}', '--vocab-size=270', '--out=~/tok'])
  assert f"(use tokenizer='hf:{home}/tok')" in capsys.readouterr().out
  assert tokenizer.build(f'hf:{home}/tok').vocab_size > 256
  assert os.listdir(cwd) == []  # No '~' directory.
  # A tokenizer dir that is not there, given as a path ('tok/'), is named as a missing
  # directory, not tried as a hub id ('Repo id must use alphanumeric chars').
  for missing in ('tok/', 'a/b/c'):
    with pytest.raises(FileNotFoundError, match=rf'^tokenizer=hf:{missing}: no such directory$'):
      tokenizer.build(f'hf:{missing}')


def test_init_from_hf_loads_onto_a_mesh_and_keeps_logits(tmp_path):
  """An HF classifier loaded onto a (2,2,2) mesh gives transformers' logits, padding included."""
  src = hf_dir(tmp_path / 'src', num_labels=3)
  cfg = small_config(objective='classification', data__label_names='c0,c1,c2')
  mesh = sharding.make_mesh(small_config(mesh__data=2, mesh__fsdp=2, mesh__tensor=2).mesh)
  model_cfg = model_lib.config_from(cfg.model, 258, 3)
  graphdef, abstract = convert.abstract_model(model_cfg, mesh)
  params, report = convert.load_params(src, model_cfg, abstract,
                                       sharding.state_shardings(abstract, mesh))
  assert report['new'] == [] and len(report['loaded']) == 29
  assert params['wte'].sharding.spec == sharding.logical_to_spec(('vocab', 'embed'))
  tokens = np.array([[10, 20, 30, 40, 50, 257, 257, 257], [1, 2, 3, 4, 5, 6, 7, 8]] * 4)
  mask = tokens != 257
  batch = {'tokens': tokens, 'positions': np.where(mask, np.arange(8), 0),
           'segment_ids': mask.astype(np.int32)}
  with sharding.activate(mesh):
    ours = np.asarray(objectives.class_logits(nnx.merge(graphdef, params),
                                              sharding.shard_batch(batch, mesh)))
  hf = transformers.GPT2ForSequenceClassification.from_pretrained(src, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(int))).logits
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)


def test_exported_demo_runs_work_in_transformers_pipelines(tmp_path, caplog):
  lm = str(tmp_path / 'lm')
  train.main(small_argv(lm, objective='labeled_pair', train__steps=3))
  assert convert.export(lm, str(tmp_path / 'lm_hf')) < 1e-4
  gen = transformers.pipeline('text-generation', model=str(tmp_path / 'lm_hf'))
  # Greedy generation equals jaxft's greedy decoding of the same checkpoint.
  cfg, tok, model = run_model(lm)
  prompt = tok.encode('12+34=')
  buf = np.array([prompt + [tok.pad_id] * 6])
  ours = np.asarray(evaluate.greedy(model, buf, np.array([len(prompt)]), 6))[0].tolist()
  text = gen('12+34=', max_new_tokens=6, do_sample=False)[0]['generated_text']
  expected = tok.decode(ours[:ours.index(tok.eos_id)] if tok.eos_id in ours else ours)
  assert text == '12+34=' + expected

  cls = str(tmp_path / 'cls')
  # Trained with params sharded over fsdp x tensor: export reads the checkpoint on the host.
  train.main(small_argv(cls, objective='classification', train__steps=3, mesh__data=2,
                        mesh__fsdp=2, mesh__tensor=2))
  assert convert.export(cls, str(tmp_path / 'cls_hf')) < 1e-4
  assert 'score.weight' not in caplog.text  # The check's LM load of a classifier: no alarm.
  clf = transformers.pipeline('text-classification', model=str(tmp_path / 'cls_hf'))
  out = clf(['12+34=', '99+99=', '5-3='])
  assert all(o['label'] in ('low', 'mid', 'high') and 0 < o['score'] <= 1 for o in out)
  # And the export comes back into a jaxft run as its init (bit for bit at lr 0).
  back = str(tmp_path / 'back')
  train.main(small_argv(back, objective='classification', train__steps=1, optim__lr=0.0,
                        train__init_from=f'hf:{tmp_path / "cls_hf"}'))
  # A head trained for low,mid,high does not load as high,mid,low, from HF or jaxft.
  for source in (f'hf:{tmp_path / "cls_hf"}', cls):
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"data.label_names: run \['high', "
                       r"'mid', 'low'\] vs source head \['low', 'mid', 'high'\]"):
      train.main(small_argv(str(tmp_path / 'reordered'), objective='classification',
                            train__steps=1, data__label_names='high,mid,low',
                            train__init_from=source))
  before = convert.read_params(os.path.join(cls, 'checkpoints', '3', 'params'), ['score', 'wpe'])
  after = convert.read_params(os.path.join(back, 'checkpoints', '1', 'params'), ['score', 'wpe'])
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])


def test_a_classifier_whose_pad_is_its_eos_reads_the_token_hf_reads(tmp_path):
  """A BPE tokenizer without a pad token pads with its end of text. HF's classifier reads a row's
  last token that is not the pad id, so text that ends in that token is read before it; jaxft,
  and so the export, do the same."""
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text(''.join(json.dumps({'text': f'{i}+{i % 7}={i + i % 7}'}) + '\n'
                            for i in range(300)))
  tokenizer.main(['train', '--input', str(corpus), '--vocab-size', '300',
                  '--out', str(tmp_path / 'tok')])
  run, out = str(tmp_path / 'cls'), str(tmp_path / 'cls_hf')
  train.main(small_argv(run, objective='classification', tokenizer=f'hf:{tmp_path / "tok"}',
                        train__steps=2))
  assert convert.export(run, out) < 1e-4
  # Evaluated with its classes named in another order, its head would score them as the wrong
  # ones: refused (other names, e.g. a dataset's own, are the user's to give).
  with pytest.raises(ConfigError, match=r"data.label_names \['high', 'mid', 'low'\] reorders the "
                     r"run's classes \['low', 'mid', 'high'\]"):
    evaluate.main(['--workdir', run, '--config.data.label_names=high,mid,low'])
  cfg, tok, model = run_model(run)
  texts = ['12+34=', '12+34=<|endoftext|>', '12+34=<|endoftext|><|endoftext|>', '9<|endoftext|>3']
  examples = objectives.get('classification').encode(
      [({'text': t, 'label': 'low'}, f'probe:{i}') for i, t in enumerate(texts)], tok, cfg.data)
  ours = np.asarray(objectives.class_logits(model, dict(examples)))
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok(texts[1])['input_ids'][-1] == tok.eos_id == tok.pad_id
  hf = transformers.GPT2ForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = np.stack([hf(input_ids=torch.tensor([hf_tok(t)['input_ids']])).logits[0].numpy()
                       for t in texts])
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  np.testing.assert_array_equal(ours[1], ours[0])  # The trailing end-of-text is not read...
  assert np.abs(ours[3] - ours[0]).max() > 1e-3  # ...one inside the text is.
  with pytest.raises(data.RecordError, match=r"probe:0: field 'text' has no tokens \(but padding\)"):
    objectives.get('classification').encode([({'text': '<|endoftext|>', 'label': 'low'}, 'probe:0')],
                                            tok, cfg.data)


def test_tokenizer_train_cli_makes_a_usable_hf_tokenizer(tmp_path):
  corpus = tmp_path / 'c.jsonl'
  corpus.write_text(''.join(json.dumps({'body': f'the cat {i} sat on the mat {i % 9}'}) + '\n'
                            for i in range(300)))
  tokenizer.main(['train', '--input', str(corpus), '--field', 'body', '--vocab-size', '300',
                  '--out', str(tmp_path / 'tok')])
  tok = tokenizer.build(f'hf:{tmp_path / "tok"}')
  assert 256 < tok.vocab_size <= 300 and tok.eos_id == tok.pad_id
  ids = tok.encode('the cat 12 sat on the mat 3')
  assert len(ids) < len('the cat 12 sat on the mat 3') and tok.decode(ids) == 'the cat 12 sat on the mat 3'
  assert tok.decode(tok.encode('ünïcode ✓')) == 'ünïcode ✓'  # Byte-level: nothing is unknown.
  # Another tokenizer of the same padded vocab (both 384): init_from would load its embeddings
  # as other tokens, so it is refused; the same tokenizer elsewhere loads.
  other = tmp_path / 'o.jsonl'
  other.write_text(''.join(json.dumps({'body': f'una gata {i} duerme {i % 7}'}) + '\n'
                           for i in range(300)))
  tokenizer.main(['train', '--input', str(other), '--field', 'body', '--vocab-size', '290',
                  '--out', str(tmp_path / 'tok2')])
  with pytest.raises(ConfigError, match=r'--vocab-size 100: must be above 257'):
    tokenizer.main(['train', '--input', str(other), '--vocab-size', '100', '--out', 'x'])
  shutil.copytree(tmp_path / 'tok', tmp_path / 'tok_copy')
  pre = str(tmp_path / 'pre')
  train.main(small_argv(pre, tokenizer=f'hf:{tmp_path / "tok"}', train__steps=1))
  with pytest.raises(checkpoint.CheckpointMismatch, match=rf'tokenizer: run hf:{tmp_path}/tok2 vs '
                     rf'source hf:{tmp_path}/tok, which encode text differently'):
    train.main(small_argv(str(tmp_path / 'a'), tokenizer=f'hf:{tmp_path / "tok2"}',
                          train__steps=1, train__init_from=pre))
  train.main(small_argv(str(tmp_path / 'b'), tokenizer=f'hf:{tmp_path / "tok_copy"}',
                        train__steps=1, train__init_from=pre))
  # Retrained in place (asked twice): the name is the same, the ids are not. The checkpoints
  # know what they were trained with: neither a resume nor an init_from takes the new one.
  retrain = ['train', '--input', str(other), '--field', 'body', '--vocab-size', '290', '--out',
             str(tmp_path / 'tok')]
  with pytest.raises(FileExistsError, match=rf'--out {tmp_path}/tok already holds a tokenizer '
                     r'\(tokenizer.json\): give another directory, or --force'):
    tokenizer.main(retrain)
  assert tokenizer.build(f'hf:{tmp_path / "tok"}').encode('the cat') == tok.encode('the cat')
  tokenizer.main(retrain + ['--force'])
  with pytest.raises(checkpoint.CheckpointMismatch, match=rf"tokenizer='hf:{tmp_path}/tok' "
                     rf'encodes text differently from the tokenizer {pre} was trained with'):
    train.main(small_argv(pre, tokenizer=f'hf:{tmp_path / "tok"}', train__steps=2))
  # Nor do the export, evaluation and generation, which read the run's config.json (whose
  # tokenizer path now holds the retrained one); nothing is written.
  before = snapshot(pre)
  retrained = rf"tokenizer='hf:{tmp_path}/tok' encodes text differently from the tokenizer " \
              rf'checkpoint {pre}/checkpoints/1 was trained with'
  with pytest.raises(checkpoint.CheckpointMismatch, match=retrained):
    convert.export(pre, str(tmp_path / 'hf_out'))
  with pytest.raises(checkpoint.CheckpointMismatch, match=retrained):
    evaluate.load(pre)
  assert not os.path.exists(tmp_path / 'hf_out') and snapshot(pre) == before
  with pytest.raises(checkpoint.CheckpointMismatch, match=rf'tokenizer: run hf:{tmp_path}/tok vs '
                     rf'source hf:{tmp_path}/tok, which encode text differently'):
    train.main(small_argv(str(tmp_path / 'c'), tokenizer=f'hf:{tmp_path / "tok"}',
                          train__steps=1, train__init_from=pre))
  other.write_text(json.dumps({'body': 7}) + '\n')
  with pytest.raises(data.RecordError, match=rf"{other}:1: field 'body' must be a string, got int"):
    tokenizer.main(['train', '--input', str(other), '--field', 'body', '--vocab-size', '290',
                    '--out', str(tmp_path / 'tok3')])
