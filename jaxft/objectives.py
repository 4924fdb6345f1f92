"""Objectives as data: records -> fixed-shape example arrays, a loss, and evaluation metrics.

Every example row has `tokens`, `positions` and `segment_ids` ([rows, seq_len]; segment id 0 marks
padding). The language-model objectives add `targets` and `loss_mask` and pack several examples
into a row, each a segment with its own positions (attention never crosses segments);
classification adds `label` and a per-row `loss_mask` ([rows]). Losses return (sum, count of
supervised units) so micro-batches, hosts and eval batches add up exactly.

    next_token      text                  every real token carries loss
    labeled_pair    prompt -> completion  only completion tokens (and the EOS after them)
    classification  text -> label         one label per row, from the last real token's state
"""
import collections
import dataclasses
import functools
import re
import string
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import data, model as model_lib

# JSON can escape half of a UTF-16 pair (\ud83d: an emoji cut short); no tokenizer can encode it.
_SURROGATE = re.compile('[\ud800-\udfff]')


class Encoded(dict):
  """Example arrays by name, plus `sources`: the records ('file:line') behind each row, the count
  of examples `dropped` for lack of supervision and the messages of bad records `skipped`."""

  def __init__(self, arrays, sources, dropped=0, skipped=()):
    super().__init__(arrays)
    self.sources = sources
    self.dropped = dropped
    self.skipped = list(skipped)


def string_field(rec, name, where):
  """A record's field that must hold text."""
  value = data.field(rec, name, where)
  if not isinstance(value, str):
    raise data.RecordError(f'{where}: field {name!r} must be a string, got {type(value).__name__}')
  if bad := _SURROGATE.search(value):
    raise data.RecordError(f'{where}: field {name!r}: lone UTF-16 surrogate '
                           f'U+{ord(bad[0]):04X} at character {bad.start()} (not text)')
  return value


def _unsupervised(where, why, data_cfg, dropped):
  """Drop-and-count or fail on an example that would carry no loss."""
  if not data_cfg.drop_unsupervised:
    raise data.DataError(f'{where}: {why}, so it carries no loss (set '
                         f'data.drop_unsupervised=True to drop and count such examples)')
  dropped.append(where)


# Each objective reads a record in two steps: `fields` checks what it needs (cheap, no tokenizing:
# records from files are all checked before training starts, a dataset's train records as they
# are read), `segments` tokenizes (train records only when they are drawn). An LM segment is (inputs, targets, loss mask) token lists, at most seq_len
# long; a classification segment is (tokens, label).

def _text_field(rec, where, data_cfg):
  text = string_field(rec, data_cfg.text_field, where)
  if not text:  # Checked with the fields, before training, as a bad record (data.on_error).
    raise data.RecordError(f'{where}: field {data_cfg.text_field!r} is empty')
  return text


def _next_token_segments(text, where, tok, data_cfg, dropped):
  """A document + EOS; documents longer than seq_len continue in further segments."""
  ids = tok.encode(text) + [tok.eos_id]
  if len(ids) < 2:  # Text the tokenizer makes nothing of (its normalizer may strip it all).
    _unsupervised(where, f'field {data_cfg.text_field!r} has no tokens', data_cfg, dropped)
    return []
  inputs, targets, T = ids[:-1], ids[1:], data_cfg.seq_len
  return [(inputs[i:i + T], targets[i:i + T], [1.0] * len(targets[i:i + T]))
          for i in range(0, len(inputs), T)]


@functools.lru_cache
def _check_template(template):
  """Refuse a data.prompt_template that is not text around {prompt} fields (another field, an
  attribute or index of the prompt, a brace left open)."""
  try:
    wrong = [f for _, f, _, _ in string.Formatter().parse(template) if f not in (None, 'prompt')]
    if not wrong:
      template.format(prompt='')  # (A conversion or format spec that does not apply to text.)
  except ValueError as e:  # (A brace left open or unmatched, an unknown conversion.)
    raise data.DataError(f'data.prompt_template={template!r}: {e} (write a literal brace as '
                         f'{{{{ or }}}})') from None
  if wrong:
    raise data.DataError(f'data.prompt_template={template!r} may only use {{prompt}} (got '
                         f'{{{wrong[0]}}})')


def shown_prompt(prompt, data_cfg):
  """A labeled_pair prompt as the model sees it: through data.prompt_template."""
  _check_template(data_cfg.prompt_template)
  return data_cfg.prompt_template.format(prompt=prompt)


def _pair_fields(rec, where, data_cfg):
  """(prompt shown through data.prompt_template, completion). An empty completion is a bad
  record, as an empty text is: it would teach the prompt's answer to be EOS."""
  _check_side(data_cfg)
  prompt = shown_prompt(string_field(rec, data_cfg.prompt_field, where), data_cfg)
  completion = string_field(rec, data_cfg.completion_field, where)
  if not completion:
    raise data.RecordError(f'{where}: field {data_cfg.completion_field!r} is empty')
  return prompt, completion


def prompt_completion_ids(rec, where, tok, data_cfg):
  """(prompt ids, completion ids + EOS), truncated to fit seq_len + 1 tokens together.

  data.truncation_side='left' cuts the prompt from the left (keeping at least one token), then the
  completion from the right; 'right' cuts the joined sequence from the right, which may leave no
  completion at all. An empty prompt becomes EOS, GPT-2's start-of-text.
  """
  return _pair_ids(_pair_fields(rec, where, data_cfg), tok, data_cfg)


def _pair_ids(fields, tok, data_cfg):
  prompt, completion = fields
  p = tok.encode(prompt) or [tok.eos_id]
  c = tok.encode(completion) + [tok.eos_id]
  room = data_cfg.seq_len + 1
  if len(p) + len(c) <= room:
    return p, c
  if data_cfg.truncation_side == 'left':
    keep = max(1, room - len(c))
    return p[len(p) - keep:], c[:room - keep]
  return p[:room], c[:max(0, room - len(p))]


def _check_side(data_cfg):
  if data_cfg.truncation_side not in ('left', 'right'):
    raise data.DataError(f"unknown data.truncation_side {data_cfg.truncation_side!r}; "
                         f"known: 'left', 'right'")


def _labeled_pair_segments(fields, where, tok, data_cfg, dropped):
  p, c = _pair_ids(fields, tok, data_cfg)
  if not c:
    _unsupervised(where, f'the prompt fills data.seq_len={data_cfg.seq_len} and the '
                  f'completion is truncated away', data_cfg, dropped)
    return []
  ids = p + c
  return [(ids[:-1], ids[1:], [0.0] * (len(p) - 1) + [1.0] * len(c))]


def _lm_arrays(rows, seq_len, pad_id):
  """Rows of LM segments -> [rows, seq_len] arrays; each segment has its own positions."""
  names = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')
  out = {k: np.zeros((len(rows), seq_len), np.float32 if k == 'loss_mask' else np.int32)
         for k in names}
  out['tokens'][:] = pad_id
  out['targets'][:] = pad_id
  for i, row in enumerate(rows):
    at = 0
    for s, (inputs, targets, mask) in enumerate(row, 1):
      n = len(inputs)
      for name, values in zip(names, (inputs, targets, mask, range(n), [s] * n)):
        out[name][i, at:at + n] = values
      at += n
  return out


def labels(data_cfg):
  """(num_labels, names): data.num_labels, or as many as data.label_names lists."""
  names = [n.strip() for n in data_cfg.label_names.split(',')] if data_cfg.label_names else []
  num = data_cfg.num_labels or len(names)
  if num < 2:
    raise data.DataError('classification needs data.num_labels >= 2 or data.label_names '
                         '(comma-separated)')
  if names and len(names) != num:
    raise data.DataError(f'data.label_names has {len(names)} names but data.num_labels={num}')
  if '' in names or len(set(names)) < len(names):  # 'a,b,' / 'a,a,b': a class no record can be.
    raise data.DataError(f'data.label_names={data_cfg.label_names!r} has an empty or repeated '
                         f'name')
  return num, names or [str(i) for i in range(num)]


def _label(rec, where, data_cfg):
  """A record's label as an int in [0, num_labels): one of the names, or that index. Names that
  are numbers (data.label_names='1,2,3,4,5', star ratings) are read as names only, from a JSON
  int as from a CSV cell: 1 and '1' are both class '1', index 0, and 0 is not a label."""
  num, names = labels(data_cfg)
  value = data.field(rec, data_cfg.label_field, where)
  name = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
  if isinstance(name, str) and name.strip() in names:  # (Names are stripped too.)
    return names.index(name.strip())
  if all(n.isdecimal() for n in names):  # 0..num-1 by default: then every index is a name too.
    raise data.RecordError(f'{where}: field {data_cfg.label_field!r} = {value!r} is not a label '
                           f'(one of {names})')
  if isinstance(value, str) and value.strip().isdecimal():  # CSV / TSV cells are strings.
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num:
    raise data.RecordError(f'{where}: field {data_cfg.label_field!r} = {value!r} is not a label '
                           f'(an int in [0, {num}) or one of {names})')
  return value


def _class_fields(rec, where, data_cfg):
  _check_side(data_cfg)
  return _text_field(rec, where, data_cfg), _label(rec, where, data_cfg)


def _class_segments(fields, where, tok, data_cfg, dropped):
  """The text (truncated on data.truncation_side to seq_len) and its label. Trailing pad ids
  (a tokenizer whose pad is its end of text, and text ending in that token) are left out: HF's
  classifier reads the last token that is not the pad id, and so does an exported jaxft one."""
  text, label = fields
  ids, T = tok.encode(text), data_cfg.seq_len
  ids = ids[-T:] if data_cfg.truncation_side == 'left' else ids[:T]
  while ids and ids[-1] == tok.pad_id:
    ids.pop()
  if not ids:
    raise data.RecordError(f'{where}: field {data_cfg.text_field!r} has no tokens (but padding)')
  return [(ids, label)]


def _class_arrays(rows, seq_len, pad_id):
  """One (tokens, label) segment per row: padded tokens, the label, a per-row loss mask."""
  n = len(rows)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  seg_ids = np.zeros((n, seq_len), np.int32)
  for i, [(ids, _)] in enumerate(rows):
    tokens[i, :len(ids)] = ids
    seg_ids[i, :len(ids)] = 1
  positions = np.where(seg_ids > 0, np.arange(seq_len, dtype=np.int32), 0)
  return {'tokens': tokens, 'positions': positions, 'segment_ids': seg_ids,
          'label': np.array([row[0][1] for row in rows], np.int32).reshape(n),
          'loss_mask': np.ones((n,), np.float32)}


def audit(examples, split):
  """Every row must carry loss: name the records of the first row that does not."""
  mask = examples['loss_mask'].reshape(len(examples['loss_mask']), -1)
  empty = np.flatnonzero(mask.sum(1) == 0)
  if len(empty):
    raise data.DataError(f'{split} row {empty[0]} has no supervised token; its records: '
                         f'{", ".join(examples.sources[empty[0]])}')


def _hidden(model, batch, dropout_key):
  return model.hidden(batch['tokens'], positions_BL=batch['positions'],
                      segment_ids_BL=batch['segment_ids'], dropout_key=dropout_key)


def token_losses(model, batch, dropout_key=None):
  """Per-token next-token cross-entropy [batch, length], zero where the loss mask is."""
  return model.token_losses(_hidden(model, batch, dropout_key), batch['targets']) * \
      batch['loss_mask']


def token_loss(model, batch, dropout_key=None):
  """(sum of masked next-token cross-entropy, number of supervised tokens)."""
  return jnp.sum(token_losses(model, batch, dropout_key)), jnp.sum(batch['loss_mask'])


def class_logits(model, batch, dropout_key=None):
  """[batch, labels] logits at each row's last real token (rows are right-padded)."""
  last_B = jnp.maximum(jnp.sum(batch['segment_ids'] > 0, axis=1) - 1, 0)
  return model.classify(_hidden(model, batch, dropout_key), last_B)


def class_loss(model, batch, dropout_key=None):
  """(sum of cross-entropy over labeled rows, number of labeled rows)."""
  ce_B = optax.softmax_cross_entropy_with_integer_labels(
      class_logits(model, batch, dropout_key), batch['label'])
  return jnp.sum(ce_B * batch['loss_mask']), jnp.sum(batch['loss_mask'])


def lm_eval_sums(model, batch):
  s, c = token_loss(model, batch)
  return {'loss_sum': s, 'count': c}


def class_eval_sums(model, batch):
  """Loss sums and the confusion matrix [true, predicted] of a batch (padding rows count 0)."""
  logits_BC = class_logits(model, batch)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch['label'])
  C = logits_BC.shape[-1]
  onehot = lambda x: jax.nn.one_hot(x, C, dtype=jnp.float32)
  confusion = jnp.einsum('bt,bp->tp', onehot(batch['label']) * batch['loss_mask'][:, None],
                         onehot(jnp.argmax(logits_BC, -1)))
  return {'loss_sum': jnp.sum(ce_B * batch['loss_mask']), 'count': jnp.sum(batch['loss_mask']),
          'confusion': confusion}


def lm_metrics(sums):
  loss = sums['loss_sum'] / sums['count']
  return {'loss': loss, 'perplexity': float(np.exp(min(loss, 50.0)))}


def class_metrics(sums):
  """Loss, accuracy, macro-F1 (classes absent from both truth and predictions are skipped) and
  the confusion matrix (rows: true label, columns: predicted)."""
  cm = np.asarray(sums['confusion'])
  tp, true, pred = np.diag(cm), cm.sum(1), cm.sum(0)
  present = (true + pred) > 0
  f1 = 2 * tp[present] / (true + pred)[present]
  return {'loss': sums['loss_sum'] / sums['count'], 'accuracy': float(tp.sum() / cm.sum()),
          'macro_f1': float(f1.mean()), 'confusion': cm.astype(int).tolist()}


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  fields: Callable  # (record, where, data_cfg) -> what it needs from the record, checked
  segments: Callable  # (fields, where, tok, data_cfg, dropped) -> [segment], tokenized
  arrays: Callable  # (rows of segments, seq_len, pad_id) -> example arrays
  loss: Callable  # (model, batch, dropout_key) -> (loss_sum, supervised count)
  eval_sums: Callable  # (model, batch) -> {name: array summed over the batch}
  metrics: Callable  # (sums over a split, as floats/np arrays) -> {metric: value}
  has_head: bool = False  # Needs model.score (data labels decide its size).
  packs: bool = True  # data.pack may put several examples in a row.

  def check(self, records, data_cfg):
    """The records this objective can use (fields checked, nothing tokenized); a bad one stops
    the run naming it, or with data.on_error='skip' is left out and listed in `skipped`
    (records.skipped, those the reader left out, are not repeated there)."""
    good = data.Records()
    for i in range(len(records)):
      with data.bad_records(data_cfg.on_error, good.skipped):
        rec, where = records[i]  # data.SourceRecords read (and may fail) here.
        self.fields(rec, where, data_cfg)
        good.append((rec, where))
    return good

  def _tokenizer(self, tok, data_cfg):
    """(records, i, dropped, skipped=dropped) -> segments of records[i]. A record without
    supervision is appended to `dropped` (or stops the run, per data.drop_unsupervised); a bad one
    raises or, with data.on_error='skip', has its message appended to `skipped`."""
    data_cfg = types.SimpleNamespace(**data_cfg)  # Read per record: ConfigDict lookups are slow.

    def segments(records, i, dropped, skipped=None):
      with data.bad_records(data_cfg.on_error, dropped if skipped is None else skipped):
        rec, where = records[i]
        return self.segments(self.fields(rec, where, data_cfg), where, tok, data_cfg, dropped)
      return []
    return segments

  def _packing(self, data_cfg):
    return self.packs and data_cfg.pack

  def encode(self, records, tok, data_cfg):
    """All of `records`, in order, as Encoded example arrays (evaluation splits, tests)."""
    good = self.check(records, data_cfg)
    dropped, tokenize = [], self._tokenizer(tok, data_cfg)
    get = lambda k: (tokenize(good, k, dropped, good.skipped), good[k][1]) if k < len(good) \
        else None
    packer = data.Packer(get, data_cfg.seq_len, self._packing(data_cfg), len(good))
    rows = list(iter(packer.row, []))
    if not rows:  # Say why, naming the first record of each kind (which file, which split).
      bad = list(getattr(records, 'skipped', [])) + good.skipped
      why = ([f'{len(dropped)} dropped without one (data.drop_unsupervised; first: '
              f'{dropped[0]})'] if dropped else []) + (
          [f'{len(bad)} bad records skipped (data.on_error=skip; first: {bad[0]})'] if bad else [])
      raise data.DataError(f'no example with a supervised token among {len(records)} records'
                           + (f': {"; ".join(why)}' if why else ''))
    return Encoded(self.arrays([[seg for seg, _ in row] for row in rows], data_cfg.seq_len,
                               tok.pad_id),
                   [list(dict.fromkeys(w for _, w in row)) for row in rows], len(dropped),
                   good.skipped)

  def stream(self, records, tok, data_cfg, batch_size, seed, process=None):
    """The train split's data.TrainStream: records (checked, or data.SourceRecords checked as
    read), tokenized as they are drawn."""
    return data.TrainStream(records, self._tokenizer(tok, data_cfg),
                            lambda rows: self.arrays(rows, data_cfg.seq_len, tok.pad_id),
                            data_cfg.seq_len, self._packing(data_cfg), batch_size, seed, process)


OBJECTIVES = {
    'next_token': Objective('next_token', _text_field, _next_token_segments, _lm_arrays,
                            token_loss, lm_eval_sums, lm_metrics),
    'labeled_pair': Objective('labeled_pair', _pair_fields, _labeled_pair_segments, _lm_arrays,
                              token_loss, lm_eval_sums, lm_metrics),
    'classification': Objective('classification', _class_fields, _class_segments, _class_arrays,
                                class_loss, class_eval_sums, class_metrics, has_head=True,
                                packs=False),
}


def model_config(cfg, tok, platform=None):
  """The GPTConfig of a run: config.model + the tokenizer's vocab + the objective's head, for
  the platform it runs on (default: this process's)."""
  has_head = get(cfg.objective).has_head
  return model_lib.config_from(cfg.model, tok.vocab_size, labels(cfg.data)[0] if has_head else 0,
                               platform)


def check_positions(cfg, model_cfg):
  """data.seq_len within the model's learned positions (train, evaluate)."""
  if cfg.data.seq_len > model_cfg.max_len:
    raise data.DataError(
        f'data.seq_len={cfg.data.seq_len} > the model\'s {model_cfg.max_len} positions '
        f'(model.max_len, or model.size={cfg.model.size!r}\'s)')


def get(name):
  if name not in OBJECTIVES:
    raise data.DataError(f'unknown objective {name!r}; known: {", ".join(OBJECTIVES)}')
  return OBJECTIVES[name]


BASELINE_RECORDS = 20_000  # Train records tokenized for the baselines (the first ones).


def baselines(objective, train_records, eval_records, eval_examples, tok, data_cfg,
              exact_match_records=0):
  """What a trivial predictor scores on the eval split: the bar a trained model must clear.

  next_token / labeled_pair: cross-entropy of train unigram frequencies on the supervised tokens;
  labeled_pair also: exact match of always answering the most common train completion, on the
  records exact match scores (the first `exact_match_records`, train.exact_match_examples; 0: all);
  classification: accuracy of always answering the most common train label. Train statistics
  come from the first BASELINE_RECORDS train records.
  """
  train_records = train_records[:BASELINE_RECORDS]
  train_examples = objective.encode(train_records, tok, data_cfg)
  if objective.name == 'classification':
    counts = np.bincount(train_examples['label'], minlength=labels(data_cfg)[0])
    return {'majority_accuracy': float(np.mean(eval_examples['label'] == counts.argmax()))}
  supervised = lambda ex: ex['targets'][ex['loss_mask'] > 0]
  # Add-one over the tokenizer's ids (the padded vocab's extra rows can never be targets).
  counts = np.bincount(supervised(train_examples), minlength=tok.vocab_size) + 1.0
  logp = np.log(counts / counts.sum())
  out = {'unigram_loss': float(-logp[supervised(eval_examples)].mean())}
  if objective.name == 'labeled_pair':
    def completions(records):  # A bad record is left out here as from training (on_error),
      for rec, where in records:  # and so is one whose completion seq_len cuts away (as from
        with data.bad_records(data_cfg.on_error, []):  # exact match: data.drop_unsupervised).
          if c := prompt_completion_ids(rec, where, tok, data_cfg)[1]:
            yield tuple(c)
    best = collections.Counter(completions(train_records)).most_common(1)[0][0]
    scored = eval_records[:exact_match_records] if exact_match_records else eval_records
    out['constant_exact_match'] = float(np.mean([c == best for c in completions(scored)]))
  return out
