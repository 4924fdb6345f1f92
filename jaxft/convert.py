"""Hugging Face GPT-2 <-> jaxft checkpoints, through one explicit name/layout table.

    python -m jaxft.convert to-hf --checkpoint runs/demo --out hf/demo [--no-verify]
    python -m jaxft.convert from-hf --model <HF dir or hub id> --out runs/imported
    python -m jaxft.train ... --config.train.init_from=hf:<HF dir or hub id>

"HF format" is what transformers (PyTorch) loads: safetensors, config.json, generation_config.json
and tokenizer files. Tensors are converted one at a time (export writes size-capped safetensors
shards; import reads each tensor and places only its shards on the mesh), so neither direction
holds two copies of the model. Only safetensors are read: no pickle, no remote code.
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxft import checkpoint, model as model_lib, objectives, sharding, tokenizer as tokenizer_lib

LM, CLASSIFIER = 'GPT2LMHeadModel', 'GPT2ForSequenceClassification'
# HF keys that hold no parameter of ours: the tied LM head and old attention-mask buffers.
IGNORED_SUFFIXES = ('lm_head.weight', '.attn.bias', '.attn.masked_bias')
# Files in an export's directory that transformers reads with the model or its tokenizer.
STALE = re.compile(r'model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|'
                   r'tokenizer(_config)?\.json|tokenizer\.model|vocab\.json|merges\.txt|'
                   r'special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)')


def table(cfg):
  """[(jaxft path, HF name, jaxft shape, HF shape, kind)] for a GPTConfig. kind says how the
  layouts relate: 'same', 'reshape' (our explicit head axes), 'transpose' (score) or 'vocab'
  (our wte has padding rows beyond the tokenizer's vocab; HF's has none)."""
  D, F, H, K = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.head_dim
  V = cfg.tokenizer_vocab or cfg.vocab_size
  rows = [('wte', 'transformer.wte.weight', (cfg.vocab_size, D), (V, D), 'vocab'),
          ('wpe', 'transformer.wpe.weight', (cfg.max_len, D), (cfg.max_len, D), 'same')]
  layer = [('ln_1/scale', 'ln_1.weight', (D,), (D,), 'same'),
           ('ln_1/bias', 'ln_1.bias', (D,), (D,), 'same'),
           ('attn/c_attn_kernel', 'attn.c_attn.weight', (D, 3, H, K), (D, 3 * D), 'reshape'),
           ('attn/c_attn_bias', 'attn.c_attn.bias', (3, H, K), (3 * D,), 'reshape'),
           ('attn/c_proj_kernel', 'attn.c_proj.weight', (H, K, D), (D, D), 'reshape'),
           ('attn/c_proj_bias', 'attn.c_proj.bias', (D,), (D,), 'same'),
           ('ln_2/scale', 'ln_2.weight', (D,), (D,), 'same'),
           ('ln_2/bias', 'ln_2.bias', (D,), (D,), 'same'),
           ('mlp/c_fc_kernel', 'mlp.c_fc.weight', (D, F), (D, F), 'same'),
           ('mlp/c_fc_bias', 'mlp.c_fc.bias', (F,), (F,), 'same'),
           ('mlp/c_proj_kernel', 'mlp.c_proj.weight', (F, D), (F, D), 'same'),
           ('mlp/c_proj_bias', 'mlp.c_proj.bias', (D,), (D,), 'same')]
  for i in range(cfg.num_layers):
    rows += [(f'h/{i}/{p}', f'transformer.h.{i}.{n}', a, b, k) for p, n, a, b, k in layer]
  rows += [('ln_f/scale', 'transformer.ln_f.weight', (D,), (D,), 'same'),
           ('ln_f/bias', 'transformer.ln_f.bias', (D,), (D,), 'same')]
  if cfg.num_labels:
    rows.append((model_lib.HEAD, 'score.weight', (D, cfg.num_labels), (cfg.num_labels, D),
                 'transpose'))
  return rows


def to_hf(x, kind, hf_shape):
  if kind == 'vocab':
    x = x[:hf_shape[0]]
  elif kind == 'transpose':
    x = x.T
  assert x.size == np.prod(hf_shape), (x.shape, hf_shape)
  return np.ascontiguousarray(x.reshape(hf_shape))


def from_hf(x, kind, shape):
  if kind == 'vocab':  # Padding rows are zero; their logits are masked (model.GPT.logits).
    x = np.concatenate([x, np.zeros((shape[0] - x.shape[0],) + x.shape[1:], x.dtype)])
  elif kind == 'transpose':
    x = x.T
  return np.ascontiguousarray(x.reshape(shape))


# ---------------------------------------------------------------------------------------------
# Configs


def hf_config(cfg, tok, label_names=None):
  """transformers GPT2Config for a GPTConfig (+ tokenizer ids, + labels for a classifier)."""
  from transformers import GPT2Config
  extra = {}
  if cfg.num_labels:
    extra = dict(num_labels=cfg.num_labels, id2label=dict(enumerate(label_names)),
                 label2id={n: i for i, n in enumerate(label_names)},
                 problem_type='single_label_classification')
  return GPT2Config(
      vocab_size=cfg.tokenizer_vocab or cfg.vocab_size, n_positions=cfg.max_len,
      n_embd=cfg.embed_dim, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
      activation_function='gelu_new', resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
      attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.ln_eps, bos_token_id=tok.eos_id,
      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_word_embeddings=True,
      architectures=[CLASSIFIER if cfg.num_labels else LM], **extra)


def read_hf_config(hf_dir):
  """(config dict, label names or None), failing on GPT-2 variants jaxft does not implement. The
  dict is transformers' GPT2Config of config.json: HF's own names (n_embd for hidden_size...) and
  defaults for what the file leaves out."""
  from transformers import GPT2Config
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{hf_dir}: no config.json (not a Hugging Face model directory)')
  try:
    raw = json.load(open(path))
  except (ValueError, UnicodeDecodeError) as e:  # A download cut short, an edit gone wrong.
    raise checkpoint.CheckpointMismatch(f'{path} is not valid JSON: {e}') from None
  if raw.get('model_type') != 'gpt2':
    raise checkpoint.CheckpointMismatch(f'{path}: unsupported config: model_type='
                                        f'{raw.get("model_type")!r} (jaxft supports \'gpt2\')')
  c = GPT2Config.from_dict(raw).to_dict()
  required = {'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
              'add_cross_attention': False, 'tie_word_embeddings': True}
  problems = [f'{k}={c[k]!r} (jaxft supports {v!r})' for k, v in required.items() if c[k] != v]
  if c['activation_function'] not in ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast'):  # All tanh.
    problems.append(f'activation_function={c["activation_function"]!r} (jaxft: tanh GELU)')
  # Without `architectures` HF's Auto classes build either head: the weights say which it has.
  arch = (c.get('architectures') or
          [CLASSIFIER if 'score.weight' in tensor_index(hf_dir) else LM])[0]
  labels = None
  if arch == CLASSIFIER:
    id2label = c.get('id2label') or {}
    n = c.get('num_labels') or len(id2label) or 2
    labels = [id2label.get(i, id2label.get(str(i), f'LABEL_{i}')) for i in range(n)]
    if n < 2:
      problems.append(f'num_labels={n} (a regression head; jaxft classifies into 2 or more labels)')
    if c.get('problem_type') not in (None, 'single_label_classification'):
      problems.append(f'problem_type={c["problem_type"]!r} (jaxft: single_label_classification, '
                      f'a softmax over the labels)')
  elif arch not in (LM, 'GPT2Model'):
    problems.append(f'architectures={c.get("architectures")} (jaxft: {LM}, {CLASSIFIER})')
  if problems:
    raise checkpoint.CheckpointMismatch(f'{path}: unsupported config: ' + '; '.join(problems))
  return c, labels


def token_id_problems(c, labels, tok):
  """Where an HF config's special token ids disagree with the tokenizer jaxft runs it with: the
  end of text (which jaxft appends to documents and stops generating at) and a classifier's pad
  id (HF's head and jaxft's read a row's last token that is not the pad id: they must agree on
  which id that is). An id outside the vocab (GPT2Config's default 50256 in a small model)
  stands for nothing and is not compared."""
  problems = []
  eos, pad = c.get('eos_token_id'), c.get('pad_token_id')
  if isinstance(eos, int) and 0 <= eos < c['vocab_size'] and eos != tok.eos_id:
    problems.append(f'eos_token_id={eos} but tokenizer {tok.spec} ends text with {tok.eos_id}')
  if labels and pad is not None and pad != tok.pad_id:
    problems.append(f'pad_token_id={pad} but tokenizer {tok.spec} pads with {tok.pad_id} (the '
                    f'classifier would read another token)')
  return problems


def gpt_config_fields(c, labels):
  """The GPTConfig fields an HF config fixes (compared with a run's model before loading)."""
  D = c['n_embd']
  return {'num_layers': c['n_layer'], 'num_heads': c['n_head'], 'embed_dim': D,
          'mlp_dim': c.get('n_inner') or 4 * D, 'max_len': c['n_positions'],
          'tokenizer_vocab': c['vocab_size'], 'ln_eps': c.get('layer_norm_epsilon', 1e-5),
          'num_labels': len(labels) if labels else 0}


def check_config(hf_dir, c, labels, model_cfg, new_ok):
  """Fail listing every field where the run's model differs from the HF checkpoint's."""
  want = gpt_config_fields(c, labels)
  diffs = [f'{k}: run {getattr(model_cfg, k)} vs checkpoint {v}' for k, v in want.items()
           if getattr(model_cfg, k) != v and not (k == 'num_labels' and new_ok(model_lib.HEAD))]
  if diffs:
    raise checkpoint.CheckpointMismatch(
        f'{hf_dir} does not match the run\'s model ({len(diffs)} differences; set config.model.* '
        f'and config.tokenizer to match):\n  ' + '\n  '.join(diffs))


# ---------------------------------------------------------------------------------------------
# Import


def abstract_model(model_cfg, mesh):
  """(graphdef, abstract Param state carrying logical axes) of a GPT, allocating nothing."""
  from flax import nnx
  with sharding.activate(mesh):
    return nnx.split(nnx.eval_shape(lambda: model_lib.GPT(model_cfg, nnx.Rngs(0))))


def check_out(out):
  """Refuse an --out that is a file, or lies under one, before any work is done."""
  path = os.path.abspath(out)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise FileExistsError(f'--out {out}: {path} is a file, not a directory')


def local_dir(name):
  """A local HF model directory, or a hub id fetched (safetensors and json files only)."""
  path = os.path.expanduser(name)  # A ~ no shell expanded (init_from=hf:~/models/x).
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or tokenizer_lib.is_path(name):
    raise FileNotFoundError(f'{name}: not a Hugging Face model directory')
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(name, allow_patterns=['*.safetensors', '*.json', '*.txt'])
  except Exception as e:  # No network, unknown id, gated repo: say which and why.
    raise FileNotFoundError(f'{name}: no such local directory, and fetching it from the '
                            f'Hugging Face hub failed ({type(e).__name__}: {e})') from None


def tensor_index(hf_dir):
  """{HF name (with 'transformer.' prefix): (file, key in file)} from the safetensors files."""
  from safetensors import safe_open
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  if os.path.isfile(index):
    try:
      files = sorted(set(json.load(open(index))['weight_map'].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise checkpoint.CheckpointMismatch(f'{index}: not a safetensors index (a JSON object with '
                                          f'a "weight_map" of tensor -> file): {e!r}') from None
  elif os.path.isfile(os.path.join(hf_dir, 'model.safetensors')):
    files = ['model.safetensors']
  else:
    found = ', '.join(sorted(os.listdir(hf_dir))) or 'nothing'
    raise FileNotFoundError(f'{hf_dir}: no model.safetensors(.index.json) (has: {found}); jaxft '
                            f'reads safetensors only (no pickle)')
  out = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    try:
      with safe_open(path, 'np') as f:
        keys = list(f.keys())
    except FileNotFoundError:
      raise FileNotFoundError(f'{path}: no such file (listed in {index})') from None
    except Exception as e:  # safetensors' own error: a file cut short (an interrupted download).
      raise checkpoint.CheckpointMismatch(f'{path} is not a readable safetensors file '
                                          f'({type(e).__name__}: {e})') from None
    for key in keys:
      full = key if key.startswith(('transformer.', 'score.', 'lm_head.')) else 'transformer.' + key
      out[full] = (path, key)
  return out


def hf_tensors(hf_dir, model_cfg, new_ok=lambda path: False):
  """(report, generator of (jaxft path, float32 numpy array in our layout)) for an HF GPT-2
  checkpoint, read one tensor at a time. Everything is checked before the first tensor is read:
  a config or shape that does not fit the model is an error listing every difference. Params
  absent from the checkpoint are allowed where new_ok(path) holds (a fresh head)."""
  from safetensors import safe_open
  c, labels = read_hf_config(hf_dir)
  check_config(hf_dir, c, labels, model_cfg, new_ok)
  index = tensor_index(hf_dir)
  files = ', '.join(sorted({os.path.basename(f) for f, _ in index.values()}))
  rows, problems = [], []
  for path, name, shape, hf_shape, kind in table(model_cfg):
    if name not in index:
      if not new_ok(path):
        problems.append(f'missing in checkpoint: {name} {hf_shape} (none of {files} has it)')
      continue
    with safe_open(index[name][0], 'np') as f:
      saved = tuple(f.get_slice(index[name][1]).get_shape())
    if saved != hf_shape:
      problems.append(f'{name}: checkpoint {saved} (in {os.path.basename(index[name][0])}) vs '
                      f'model {hf_shape}')
    rows.append((path, name, shape, kind))
  used = {name for _, name, _, _ in rows}
  # Weights of blocks beyond the config's n_layer: its config.json does not describe them.
  problems += [f'{n}: not in the model (config.json has n_layer={model_cfg.num_layers})'
               for n in sorted(index) if n not in used and
               int((re.match(r'transformer\.h\.(\d+)\.', n) or [0, -1])[1]) >= model_cfg.num_layers]
  if problems:
    raise checkpoint.CheckpointMismatch(f'{hf_dir} does not fit the model ({len(problems)} '
                                        f'differences):\n  ' + '\n  '.join(problems))
  report = {'loaded': [r[0] for r in rows], 'source': hf_dir,
            'new': [p for p, *_ in table(model_cfg) if p not in {r[0] for r in rows}],
            'ignored': sorted(n for n in index if n not in used and not n.endswith(IGNORED_SUFFIXES))}

  def tensors():
    for path, name, shape, kind in rows:
      with safe_open(index[name][0], 'np') as f:
        x = f.get_tensor(index[name][1])
      yield path, from_hf(x.astype(np.float32), kind, shape)
  return report, tensors()


def load_params(hf_dir, model_cfg, params, shardings, new_ok=lambda path: False):
  """Params of an HF GPT-2 checkpoint placed with `shardings` (each device gets only its shard),
  the rest kept from `params` (see hf_tensors). Returns (params, report) like
  checkpoint.restore_params."""
  report, tensors = hf_tensors(hf_dir, model_cfg, new_ok)
  flat_shardings = {model_lib.path_str(p): s
                    for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  loaded = {path: jax.make_array_from_callback(x.shape, flat_shardings[path], lambda i, x=x: x[i])
            for path, x in tensors}
  return model_lib.map_with_path(lambda k, x: loaded.get(k, x), params), report


def import_hf(name, out, tokenizer=None, config=None):
  """`from-hf`: an HF checkpoint -> a jaxft workdir (params at step 0 + config.json) that
  init_from, to-hf and evaluation read. `tokenizer` (a jaxft tokenizer spec) for a model
  directory that has none of its own; by default the model's. `config` (FILE[:variant], default
  configs/common.py): the rest of the recorded config, e.g. the data to evaluate on."""
  from jaxft import config as config_lib
  cfg = config_lib.load_file(config or config_lib.COMMON)  # Fails before anything is written.
  check_out(out)
  ckpts = os.path.join(out, 'checkpoints')
  if os.path.exists(os.path.join(out, 'config.json')) or (
      os.path.isdir(ckpts) and ocp.utils.checkpoint_steps(ckpts)):
    raise FileExistsError(f'{out} already holds a jaxft run (config.json or checkpoints/); '
                          f'from-hf writes a new workdir: give another --out')
  if os.path.isdir(ckpts):  # No finished step, no config.json (written last): an import cut short.
    print(f'{ckpts}: an unfinished from-hf (no checkpoint, no config.json): written anew')
    shutil.rmtree(ckpts)
  hf_dir = local_dir(name)
  c, labels = read_hf_config(hf_dir)
  fields = gpt_config_fields(c, labels)
  local = os.path.isdir(os.path.expanduser(name))  # (Else a hub id: its name is the spec.)
  spec = tokenizer or f'hf:{os.path.abspath(hf_dir) if local else name}'
  tok = tokenizer_lib.build(spec)
  if tok.vocab_size != c['vocab_size']:  # jaxft's vocab is the tokenizer's: they must agree.
    raise checkpoint.CheckpointMismatch(
        f'{hf_dir}/config.json: vocab_size={c["vocab_size"]} but tokenizer {spec} has '
        f'{tok.vocab_size} ids; jaxft takes its vocab from the tokenizer (give --tokenizer)')
  problems = token_id_problems(c, labels, tok)
  if problems:
    raise checkpoint.CheckpointMismatch(f'{hf_dir}/config.json: ' + '; '.join(problems))
  if labels or cfg.objective == 'classification':  # The head decides; an LM keeps its objective.
    cfg.objective = 'classification' if labels else 'next_token'
  cfg.tokenizer = spec
  # jaxft's one dropout rate stands for HF's three (GPT-2's checkpoints give them one value;
  # resid_pdrop's is taken), recorded for what to-hf writes back; an init_from run keeps its own.
  cfg.model.update({'size': 'gpt2', 'vocab_size': None, 'dropout': c['resid_pdrop'], **{
      k: fields[k] for k in ('num_layers', 'num_heads', 'embed_dim', 'mlp_dim', 'max_len',
                             'ln_eps')}})
  if any(',' in name for name in labels or []):  # data.label_names is comma-separated.
    raise checkpoint.CheckpointMismatch(
        f'{hf_dir}/config.json: label {next(n for n in labels if "," in n)!r} (id2label) has a '
        f'comma, which data.label_names cannot hold: rename it there')
  # data.seq_len within the model's positions, so the recorded config runs as it is.
  cfg.data.update({'num_labels': len(labels or []), 'label_names': ','.join(labels or []),
                   'seq_len': min(cfg.data.seq_len, fields['max_len'])})
  model_cfg = model_lib.config_from(cfg.model, c['vocab_size'], fields['num_labels'])
  report, tensors = hf_tensors(hf_dir, model_cfg)
  params = {}  # In the checkpoint's tree layout, one tensor converted at a time.
  for path, x in tensors:
    node = params
    for part in path.split('/'):
      node = node.setdefault(part, {})
    node['value'] = jax.device_put(x)
    del x
  # Synchronous, uncompressed, at most 1 GB in flight: the save adds little to the model's bytes.
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1,
                                        use_compression=False)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(os.path.abspath(os.path.join(out, 'checkpoints')), options=options,
                             item_handlers={'params': handler}) as mngr:
    mngr.save(0, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params)))
  config_lib.save(cfg, out)
  return report


# ---------------------------------------------------------------------------------------------
# Export


def read_params(params_dir, paths):
  """{path: numpy array} for some params of an orbax checkpoint, read on the host only."""
  item, args = {}, {}
  for p in paths:
    node_i, node_a = item, args
    for part in p.split('/'):
      node_i, node_a = node_i.setdefault(part, {}), node_a.setdefault(part, {})
    node_i['value'] = 0
    node_a['value'] = ocp.RestoreArgs(restore_type=np.ndarray)
  out = ocp.PyTreeCheckpointer().restore(params_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=args, partial_restore=True))
  return {model_lib.path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(out)}


def check_tokenizer(cfg, tok, directory, step):
  """Refuse a tokenizer that encodes text differently from the one checkpoint `step` was
  trained with (the fingerprint saved with its data state; a from-hf import saves none): its
  ids would no longer be the rows the embeddings learned."""
  saved = checkpoint.saved_data(directory, step).get('tokenizer')
  if saved is not None and saved != tokenizer_lib.fingerprint(tok):
    raise checkpoint.CheckpointMismatch(
        f'tokenizer={cfg.tokenizer!r} encodes text differently from the tokenizer checkpoint '
        f'{directory}/{step} was trained with (its saved fingerprint): was it retrained or '
        f'replaced? Point the run\'s config.json tokenizer at the one it was trained with')


def export(path, out, verify=True, shard_bytes=2 ** 28):
  """`to-hf`: write an HF model directory for a jaxft checkpoint; verify it unless told not to.
  Returns the max abs logit difference (None without verification)."""
  check_out(out)
  cfg, directory, step = checkpoint.run_config(path)
  tok = tokenizer_lib.build(cfg.tokenizer)
  check_tokenizer(cfg, tok, directory, step)
  model_cfg = objectives.model_config(cfg, tok)
  label_names = objectives.labels(cfg.data)[1] if model_cfg.num_labels else None
  params_dir = os.path.join(directory, str(step), 'params')
  rows = table(model_cfg)
  checkpoint.check_params(params_dir, {p: jax.ShapeDtypeStruct(s, np.float32)
                                       for p, _, s, *_ in rows})
  # Shards of at most shard_bytes, filled in table order; each is read, written and dropped.
  shards, size = [[]], 0
  for row in rows:
    nbytes = 4 * int(np.prod(row[3]))
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(row)
    size += nbytes
  if os.path.isdir(os.path.join(out, 'checkpoints')):  # Its config.json would be overwritten.
    raise FileExistsError(f'{out} is a jaxft workdir; give to-hf another --out')
  # Written and verified beside --out, then moved in: an export that fails its check (or is
  # cut short) leaves --out as it was. Beside where --out really is: a rename cannot cross
  # file systems, and a symlinked --out may point to another one.
  parent, base = os.path.split(os.path.realpath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{base}-', dir=parent)
  try:
    _write_hf(staging, params_dir, shards, model_cfg, tok, label_names, cfg.data)
    try:
      diff = verify_export(staging, params_dir, model_cfg, tok) if verify else None
    except checkpoint.CheckpointMismatch as e:
      raise checkpoint.CheckpointMismatch(f'{path} -> {out}: {e} ({out} left as it was)') from None
    os.makedirs(out, exist_ok=True)
    # An earlier export's weights would be loaded alongside (or instead of) these, as
    # save_pretrained also knows, and another tokenizer's files (added tokens, special tokens,
    # a chat template) would be read into this one: they go first.
    written = os.listdir(staging)
    for old in os.listdir(out):
      if old not in written and STALE.fullmatch(old):
        os.remove(os.path.join(out, old))
    for name in written:
      os.replace(os.path.join(staging, name), os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return diff


def _write_hf(out, params_dir, shards, model_cfg, tok, label_names, data_cfg):
  """The HF files of an export: weight shards, config, generation config, tokenizer."""
  from safetensors.numpy import save_file
  from transformers import GenerationConfig
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  weight_map = {}
  for name, shard in zip(names, shards):
    values = read_params(params_dir, [r[0] for r in shard])
    tensors = {hf: to_hf(values.pop(p), kind, hf_shape) for p, hf, _, hf_shape, kind in shard}
    save_file(tensors, os.path.join(out, name), metadata={'format': 'pt'})
    weight_map.update({hf: name for hf in tensors})
    del tensors
  if len(shards) > 1:
    total = sum(4 * int(np.prod(r[3])) for shard in shards for r in shard)
    with open(os.path.join(out, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=1)
  hf_cfg = hf_config(model_cfg, tok, label_names)
  hf_cfg.save_pretrained(out)
  GenerationConfig.from_model_config(hf_cfg).save_pretrained(out)
  hf_tok = tokenizer_lib.as_hf(tok)
  if hf_tok.pad_token is None:
    hf_tok.pad_token = hf_tok.convert_ids_to_tokens(tok.pad_id)
  hf_tok.model_max_length = model_cfg.max_len  # truncation=True cuts to the positions there are,
  # On the side the run's data was cut (saved from init_kwargs: the attribute alone is not).
  hf_tok.truncation_side = hf_tok.init_kwargs['truncation_side'] = data_cfg.truncation_side
  hf_tok.save_pretrained(out)


def verify_export(out, params_dir, model_cfg, tok, tolerance=1e-4):
  """Max abs difference between jaxft's and transformers' fp32 logits (LM, and the classifier's
  when there is one) on a padded batch; raises if above `tolerance` times the largest logit
  (at least 1: float32's rounding grows with the values rounded)."""
  import torch
  from flax import nnx
  from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
  from transformers.utils import logging as hf_logging
  rng = np.random.default_rng(0)
  V, L = model_cfg.tokenizer_vocab, min(model_cfg.max_len, 24)
  real = [tid for tid in range(min(V, 1024)) if tid not in (tok.pad_id, tok.eos_id)]
  tokens = rng.choice(real, size=(3, L)).astype(np.int32)
  lengths = np.clip([L, L - 7, 5], 1, L)  # Each row has a real token, at any max_len.
  mask = np.arange(L)[None] < lengths[:, None]
  tokens[~mask] = tok.pad_id
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}),
                            jax.devices()[:1])
  # Compared in float32 on both sides: a bf16 run's params are float32 (its compute dtype is not
  # what was exported).
  graphdef, abstract = abstract_model(dataclasses.replace(model_cfg, dtype='float32'), mesh)
  values = read_params(params_dir, [r[0] for r in table(model_cfg)])
  model = nnx.merge(graphdef, model_lib.map_with_path(
      lambda p, _: jnp.asarray(values.pop(p)), abstract))
  batch = {'tokens': tokens, 'positions': np.where(mask, np.arange(L), 0),
           'segment_ids': mask.astype(np.int32)}
  ours = np.asarray(model.logits(model.hidden(tokens, batch['positions'], batch['segment_ids'])))
  SAFE = {'use_safetensors': True, 'trust_remote_code': False}  # Never pickle, never remote code.
  verbosity = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()  # Its report on a classifier's score.weight is expected here.
  try:
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **SAFE).eval()
  finally:
    hf_logging.set_verbosity(verbosity)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
  diff = float(np.abs(ours[..., :V] - theirs)[mask].max())
  scale = float(np.abs(ours[..., :V])[mask].max())
  if model_cfg.num_labels:
    with torch.no_grad():
      hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32,
                                                              **SAFE).eval()
      theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                  attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    ours = np.asarray(objectives.class_logits(model, batch))
    diff, scale = max(diff, float(np.abs(ours - theirs).max())), max(scale, np.abs(ours).max())
  if not diff <= tolerance * max(1.0, scale):
    raise checkpoint.CheckpointMismatch(
        f'transformers logits differ from jaxft by {diff:.3g} > {tolerance:g} x the largest '
        f'logit ({scale:.3g}, at least 1): the export is wrong')
  return diff


def main(argv):
  parser = argparse.ArgumentParser(prog='python -m jaxft.convert')
  sub = parser.add_subparsers(dest='command', required=True)
  t = sub.add_parser('to-hf', help='jaxft checkpoint -> Hugging Face directory')
  t.add_argument('--checkpoint', required=True, help='jaxft workdir or checkpoint step dir')
  # A ~ no shell expanded (--out=~/x) is the home directory, as in the inputs.
  t.add_argument('--out', required=True, type=os.path.expanduser)
  t.add_argument('--no-verify', action='store_true', help='skip the transformers logits check')
  f = sub.add_parser('from-hf', help='Hugging Face directory or hub id -> jaxft workdir')
  f.add_argument('--model', required=True)
  f.add_argument('--out', required=True, type=os.path.expanduser)
  f.add_argument('--tokenizer', help="for a model directory without tokenizer files: 'bytes' "
                 "or 'hf:<dir or hub id>' (default: the model's own)")
  f.add_argument('--config', help='FILE[:variant] for the rest of the recorded config (data, '
                 'evaluation); model, tokenizer and objective are the checkpoint\'s (default: '
                 'configs/common.py)')
  args = parser.parse_args(argv)
  if args.command == 'to-hf':
    diff = export(args.checkpoint, args.out, verify=not args.no_verify)
    check = ('verification skipped (--no-verify)' if diff is None else
             f'transformers logits match jaxft within {diff:.2g} (fp32)')
    print(f'wrote {os.path.abspath(args.out)}; {check}')
  else:
    report = import_hf(args.model, args.out, args.tokenizer, args.config)
    ignored = (f'; not GPT-2 weights, ignored: {", ".join(report["ignored"])}'
               if report['ignored'] else '')
    print(f'wrote {os.path.abspath(args.out)}: {len(report["loaded"])} params from '
          f'{report["source"]}{ignored}; use --config.train.init_from={args.out}')


if __name__ == '__main__':
  from jaxft import cli
  cli.run(main)
