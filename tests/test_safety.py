"""Weights are read and written as safetensors only: no pickle is ever loaded and no code shipped
with a model or tokenizer (remote code, auto_map) is ever run."""
import ast
import glob
import json
import os
import pickle
import re


from conftest import ROOT
from jaxft import convert, tokenizer
from test_convert import hf_dir


class Trap:
  """Unpickling this runs code: it creates the file `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, 'w')


def sources():
  return sorted(glob.glob(os.path.join(ROOT, 'jaxft', '*.py')) +
                glob.glob(os.path.join(ROOT, 'experiments', '*.py')))


def test_no_pickle_loading_and_no_remote_code_in_the_sources():
  forbidden = re.compile(r'\bimport pickle\b|\bpickle\.load|torch\.load\(|allow_pickle\s*=\s*True|'
                         r'trust_remote_code\s*=\s*True|\bjoblib\b|\bdill\b|weights_only\s*=\s*False')
  hits = [f'{path}:{i}: {line.strip()}' for path in sources()
          for i, line in enumerate(open(path), 1) if forbidden.search(line)]
  assert not hits, hits
  # Every transformers from_pretrained says trust_remote_code=False (directly or via **SAFE).
  calls = 0
  for path in sources():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'from_pretrained':
        calls += 1
        kw = {k.arg: k.value for k in node.keywords}
        safe = (isinstance(kw.get('trust_remote_code'), ast.Constant) and
                kw['trust_remote_code'].value is False) or \
            any(k.arg is None and getattr(k.value, 'id', '') == 'SAFE' for k in node.keywords)
        assert safe, f'{path}:{node.lineno}: from_pretrained without trust_remote_code=False'
  assert calls >= 3
  convert_src = open(os.path.join(ROOT, 'jaxft', 'convert.py')).read()
  assert "SAFE = {'use_safetensors': True, 'trust_remote_code': False}" in convert_src


def test_a_pickle_and_remote_code_next_to_the_weights_are_never_run(tmp_path):
  """An HF dir holding safetensors plus a booby-trapped pytorch_model.bin, custom modeling code
  named by auto_map and a tokenizer asking for remote code: import, init and export never run any
  of it (a marker file would appear)."""
  hf = hf_dir(tmp_path / 'hf')
  markers = [tmp_path / f'ran_{what}' for what in ('pickle', 'model_code', 'tokenizer_code')]
  with open(os.path.join(hf, 'pytorch_model.bin'), 'wb') as f:
    pickle.dump({'weight': Trap(str(markers[0]))}, f)
  for name, marker in (('modeling_evil.py', markers[1]), ('tokenization_evil.py', markers[2])):
    with open(os.path.join(hf, name), 'w') as f:
      f.write(f'open({str(marker)!r}, "w").close()\n')
  cfg = json.load(open(os.path.join(hf, 'config.json')))
  cfg['auto_map'] = {'AutoModelForCausalLM': 'modeling_evil.Evil'}
  json.dump(cfg, open(os.path.join(hf, 'config.json'), 'w'))
  tok_cfg_path = os.path.join(hf, 'tokenizer_config.json')
  tok_cfg = json.load(open(tok_cfg_path))
  tok_cfg['auto_map'] = {'AutoTokenizer': ['tokenization_evil.Evil', 'tokenization_evil.Evil']}
  json.dump(tok_cfg, open(tok_cfg_path, 'w'))

  out = str(tmp_path / 'jaxft')
  convert.main(['from-hf', '--model', hf, '--out', out])
  try:
    tokenizer.build(f'hf:{hf}')
  except ValueError as e:  # transformers refuses a tokenizer that needs remote code: fine too.
    assert 'trust_remote_code' in str(e)
  convert.main(['to-hf', '--checkpoint', out, '--out', str(tmp_path / 'export')])
  assert not [m for m in markers if m.exists()]
  exported = os.listdir(tmp_path / 'export')
  assert 'model.safetensors' in exported and not [f for f in exported if f.endswith(('.bin', '.py'))]
