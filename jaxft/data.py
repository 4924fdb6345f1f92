"""Records from files (or the demo generator) -> examples (numpy) -> Grain batches.

A record is a dict plus where it came from ('file.jsonl:12'), so every error can name its input.
The objective turns records into fixed-shape example arrays; Grain shuffles and batches them
deterministically, and the iterator's position is saved with each checkpoint.
"""
import glob
import json

import grain
import jax
import numpy as np

from jaxft import demo_data


class DataError(ValueError):
  """Bad input data; the message names the file, line and field."""


def _decode(raw, path, line):
  """UTF-8 text, or an error naming the file, line and byte offset."""
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path}:{line}: invalid UTF-8 at byte {e.start} of the line') from None


def read_records(pattern):
  """[(record, 'file:line'), ...] from .jsonl files (a dict per line) or .txt files (one record each)."""
  files = sorted(glob.glob(pattern))
  if not files:
    raise DataError(f'no data file matches {pattern!r}')
  records = []
  for path in files:
    start = len(records)
    if path.endswith('.jsonl'):
      with open(path, 'rb') as f:
        for i, raw in enumerate(f, 1):
          line = _decode(raw, path, i)
          if not line.strip():
            continue
          try:
            rec = json.loads(line.rstrip('\r\n'))
          except json.JSONDecodeError as e:
            raise DataError(f'{path}:{i}: malformed JSON line: {e.msg} (column {e.colno})') from None
          if not isinstance(rec, dict):
            raise DataError(f'{path}:{i}: expected a JSON object, got {type(rec).__name__}')
          records.append((rec, f'{path}:{i}'))
    elif path.endswith('.txt'):
      with open(path, 'rb') as f:
        lines = [_decode(raw, path, i) for i, raw in enumerate(f, 1)]
      if ''.join(lines).strip():
        records.append(({'text': ''.join(lines)}, path))
    else:
      raise DataError(f'{path}: unsupported file type (use .jsonl or .txt)')
    if len(records) == start:  # Most likely a failed export or the wrong file: say so.
      raise DataError(f'{path}: empty file (no records)')
  return records


def field(record, name, where):
  """record[name], or an error naming the record and the missing field."""
  if name not in record:
    raise DataError(f'{where}: missing field {name!r} (has: {", ".join(record) or "nothing"})')
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
  """{'train', 'val', 'test'} -> [(record, where)], from files or the demo generator."""
  if data_cfg.source == 'demo':
    parts = demo_data.splits(data_cfg.demo.num_examples, seed)
    return {s: [(r, f'demo:{s}:{i}') for i, r in enumerate(rs)] for s, rs in parts.items()}
  if data_cfg.source != 'files':
    raise DataError(f"unknown data.source {data_cfg.source!r}; known: 'files', 'demo'")
  if not data_cfg.train:
    raise DataError('data.train is empty: give a .jsonl/.txt file or glob (or data.source=demo)')
  splits = {'train': read_records(data_cfg.train)}
  for offset, name in enumerate(('val', 'test'), 1):
    if data_cfg[name]:
      splits[name] = read_records(data_cfg[name])
    else:
      splits['train'], splits[name] = _hold_out(
          splits['train'], data_cfg[f'{name}_fraction'], seed + offset, name)
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
