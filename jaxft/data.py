"""Records from files (or the demo generator) -> examples (numpy) -> Grain batches.

A record is a dict plus where it came from ('file.jsonl:12'), so every error can name its input.
The objective turns records into fixed-shape example arrays; Grain shuffles and batches them
deterministically, and the iterator's position is saved with each checkpoint.
"""
import contextlib
import csv
import glob
import gzip
import io
import json

import grain
import jax
import numpy as np

from jaxft import demo_data


class DataError(ValueError):
  """Bad input data; the message names the file, line and field."""


class RecordError(DataError):
  """One bad record (the message names its file:line): with data.on_error='skip' it is left out
  and counted instead of stopping the run."""


@contextlib.contextmanager
def bad_records(on_error, skipped):
  """Inside: a RecordError stops the run (on_error='raise') or is appended to `skipped` ('skip')."""
  if on_error not in ('raise', 'skip'):
    raise DataError(f"unknown data.on_error {on_error!r}; known: 'raise', 'skip'")
  try:
    yield
  except RecordError as e:
    if on_error == 'raise':
      raise
    skipped.append(str(e))


class Records(list):
  """[(record, 'file:line'), ...] plus `skipped`: the messages of bad records left out."""

  def __init__(self, items=(), skipped=()):
    super().__init__(items)
    self.skipped = list(skipped)


def _decode(raw, path, line):
  """UTF-8 text, or an error naming the file, line and byte offset."""
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise RecordError(f'{path}:{line}: invalid UTF-8 at byte {e.start} of the line') from None


def _json_line(raw, path, i):
  """The dict on line i of a .jsonl file (None for a blank line)."""
  line = _decode(raw, path, i)
  if not line.strip():
    return None
  try:
    rec = json.loads(line.rstrip('\r\n'))
  except json.JSONDecodeError as e:
    raise RecordError(f'{path}:{i}: malformed JSON line: {e.msg} (column {e.colno})') from None
  if not isinstance(rec, dict):
    raise RecordError(f'{path}:{i}: expected a JSON object, got {type(rec).__name__}')
  return rec


def _jsonl(path, on_error, skipped):
  with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
    for i, raw in enumerate(f, 1):
      with bad_records(on_error, skipped):
        if (rec := _json_line(raw, path, i)) is not None:
          yield rec, f'{path}:{i}'


def _table(path, on_error, skipped):
  """Rows of a .csv / .tsv file with a header line, as dicts of strings."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:  # A table is parsed whole: one bad byte stops it, named.
    line = raw[:e.start].count(b'\n') + 1
    raise DataError(f'{path}:{line}: invalid UTF-8 at byte {e.start} of the file') from None
  reader = csv.DictReader(io.StringIO(text, newline=''),
                          delimiter='\t' if path.endswith('.tsv') else ',')
  for row in reader:
    with bad_records(on_error, skipped):
      if None in row or None in row.values():  # Extra cells land under None, missing ones are None.
        cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
        raise RecordError(f'{path}:{reader.line_num}: {cells} cells, the header has '
                          f'{len(reader.fieldnames)}')
      yield row, f'{path}:{reader.line_num}'


def _txt(path, on_error, skipped):
  """The whole file as one document."""
  text = ''
  with bad_records(on_error, skipped), open(path, 'rb') as f:
    text = ''.join(_decode(raw, path, i) for i, raw in enumerate(f, 1))
  if text.strip():
    yield {'text': text}, path


READERS = {'.jsonl': _jsonl, '.jsonl.gz': _jsonl, '.csv': _table, '.tsv': _table, '.txt': _txt}


def read_records(pattern, on_error='raise'):
  """Records from the files matching `pattern`: .jsonl / .jsonl.gz (a JSON object per line),
  .csv / .tsv (a header line, then a record per row) or .txt (one file = one {'text'} record).
  Bad records stop the read naming file:line, or with on_error='skip' are left out and listed in
  the result's `skipped`."""
  files = sorted(glob.glob(pattern))
  if not files:
    raise DataError(f'no data file matches {pattern!r}')
  records = Records()
  for path in files:
    reader = next((r for ext, r in READERS.items() if path.endswith(ext)), None)
    if reader is None:
      raise DataError(f'{path}: unsupported file type (use {", ".join(READERS)})')
    start, bad = len(records), len(records.skipped)
    records += reader(path, on_error, records.skipped)
    if len(records) == start and len(records.skipped) == bad:  # A failed export, a wrong file?
      raise DataError(f'{path}: empty file (no records)')
  return records


def field(record, name, where):
  """record[name], or an error naming the record and the missing field."""
  if name not in record:
    raise RecordError(f'{where}: missing field {name!r} (has: {", ".join(record) or "nothing"})')
  return record[name]


def _hold_out(records, fraction, seed, name):
  """Split off a seeded random `fraction` of records: (rest, held_out)."""
  n = int(round(len(records) * fraction))
  if n == 0:
    raise DataError(f'data.{name} is empty and data.{name}_fraction={fraction} of {len(records)} '
                    f'records holds out nothing: give data.{name} or a larger fraction')
  order = np.random.default_rng(seed).permutation(len(records))
  held = set(order[:n].tolist())
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])


def load_splits(data_cfg, seed):
  """{'train', 'val', 'test'} -> Records, from files or the demo generator."""
  if data_cfg.source == 'demo':
    parts = demo_data.splits(data_cfg.demo.num_examples, seed)
    return {s: Records((r, f'demo:{s}:{i}') for i, r in enumerate(rs)) for s, rs in parts.items()}
  if data_cfg.source != 'files':
    raise DataError(f"unknown data.source {data_cfg.source!r}; known: 'files', 'demo'")
  if not data_cfg.train:
    raise DataError('data.train is empty: give a data file or glob (or data.source=demo)')
  splits = {'train': read_records(data_cfg.train, data_cfg.on_error)}
  for offset, name in enumerate(('val', 'test'), 1):
    if data_cfg[name]:
      splits[name] = read_records(data_cfg[name], data_cfg.on_error)
    else:
      rest, held = _hold_out(splits['train'], data_cfg[f'{name}_fraction'], seed + offset, name)
      splits['train'], splits[name] = Records(rest, splits['train'].skipped), Records(held)
  return splits


def _process_rows(batch_size):
  """This host's slice of each global batch."""
  n, i = jax.process_count(), jax.process_index()
  if batch_size % n:
    raise DataError(f'global batch {batch_size} does not divide over {n} processes')
  per = batch_size // n
  return slice(i * per, (i + 1) * per)


def train_dataset(examples, batch_size, seed):
  """Endless, seeded-shuffled (fresh order each epoch) Grain dataset of this host's batch rows."""
  n = len(next(iter(examples.values())))
  if n < batch_size:
    raise DataError(f'train split has {n} examples, fewer than one batch of {batch_size}')
  rows = _process_rows(batch_size)
  return (grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
          .batch(batch_size, drop_remainder=True)
          .map(lambda idx: {k: v[idx[rows]] for k, v in examples.items()}))


def eval_batches(examples, batch_size, max_batches=0):
  """This host's rows of fixed-size batches over a split, in order; the last batch is padded with
  rows whose loss mask is zero so every batch shards the same way."""
  n = len(next(iter(examples.values())))
  num = -(-n // batch_size)
  if max_batches:
    num = min(num, max_batches)
  rows = _process_rows(batch_size)
  for b in range(num):
    idx = np.arange(b * batch_size, (b + 1) * batch_size)
    real = idx < n
    batch = {k: v[np.where(real, idx, 0)] for k, v in examples.items()}
    batch['loss_mask'] = batch['loss_mask'] * real.reshape((-1,) + (1,) * (batch['loss_mask'].ndim - 1))
    yield {k: v[rows] for k, v in batch.items()}
