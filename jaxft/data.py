"""Records from files (or the demo generator) -> checked records -> batches.

A record is a dict plus where it came from ('file.jsonl:12'), so every error can name its input.
Evaluation splits are encoded whole by the objective (objectives.Objective.encode); the train
split is a TrainStream: an order fixed by (seed, records) alone, tokenized and packed as it is
drawn, by each process for its own rows only, whose position is saved with each checkpoint.
"""
import contextlib
import csv
import functools
import glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import zlib

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxft import demo_data

BOM = b'\xef\xbb\xbf'  # A UTF-8 byte-order mark (some Windows editors write one): not text.


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
  lazy = False  # Every record is in memory, read and checked.

  def __init__(self, items=(), skipped=()):
    super().__init__(items)
    self.skipped = list(skipped)

  def take(self, indices):
    return Records([self[i] for i in indices])


class SourceRecords:
  """A dataset split (TFDS / HF `datasets`: random access) as records, each read only when asked
  for: [i] -> (record, '<spec>[<index>]'). A bad one (invalid UTF-8) raises a RecordError then."""
  lazy = True

  def __init__(self, source, spec, indices=None):
    self.source, self.spec, self.skipped = source, spec, []
    self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.take(range(len(self))[i])
    j = int(self.indices[i])
    where = f'{self.spec}[{j}]'
    return {k: _plain(v, where, k) for k, v in self.source[j].items()}, where

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def take(self, indices):
    return SourceRecords(self.source, self.spec, self.indices[np.asarray(indices, int)])


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
  with epath.Path(path).open('rb') as raw_file, (
      gzip.GzipFile(fileobj=raw_file) if path.endswith('.gz') else raw_file) as f:
    i = 0
    try:
      for i, raw in enumerate(f, 1):
        if i == 1:
          raw = raw.removeprefix(BOM)
        with bad_records(on_error, skipped):
          if (rec := _json_line(raw, path, i)) is not None:
            yield rec, f'{path}:{i}'
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # The rest of the file is unreadable.
      raise DataError(f'{path}: unreadable as gzip after {i} lines: {e}') from None


def _table(path, on_error, skipped):
  """Rows of a .csv / .tsv file with a header line, as dicts of strings."""
  raw = epath.Path(path).read_bytes()
  body = raw.removeprefix(BOM)  # (Excel's "CSV UTF-8" writes one: not part of the header.)
  try:
    text = body.decode('utf-8')
  except UnicodeDecodeError as e:  # A table is parsed whole: one bad byte stops it, named.
    at = e.start + len(raw) - len(body)  # Of the file, as an editor counts: the BOM included.
    line = raw[:at].count(b'\n') + 1
    raise DataError(f'{path}:{line}: invalid UTF-8 at byte {at} of the file') from None
  # CSV quotes cells with "..."; a TSV (GLUE-style) has no quoting: a " is part of its cell.
  reader = csv.reader(io.StringIO(text, newline=''), **(
      dict(delimiter='\t', quoting=csv.QUOTE_NONE) if path.endswith('.tsv') else {}))
  header = next(reader, [])
  # A row is named by the line it starts on (a quoted cell may hold line breaks, a blank line
  # gives no row): the one after the line the row (or blank line) before ended on.
  start = reader.line_num + 1
  for cells in reader:
    where, start = f'{path}:{start}', reader.line_num + 1
    if not cells:  # A blank line.
      continue
    with bad_records(on_error, skipped):
      if len(cells) != len(header):
        raise RecordError(f'{where}: {len(cells)} cells, the header has {len(header)}')
      yield dict(zip(header, cells)), where


def _txt(path, on_error, skipped):
  """The whole file as one document."""
  text = ''
  with bad_records(on_error, skipped), epath.Path(path).open('rb') as f:
    text = ''.join(_decode(raw.removeprefix(BOM) if i == 1 else raw, path, i)
                   for i, raw in enumerate(f, 1))
  if text.strip():
    yield {'text': text}, path


READERS = {'.jsonl': _jsonl, '.jsonl.gz': _jsonl, '.csv': _table, '.tsv': _table, '.txt': _txt}


def _files(pattern):
  """The files matching `pattern`, sorted (remote ones, gs://...: wildcards in the name only), or
  the one file named so ('reviews[2023].jsonl': its brackets are no wildcard)."""
  pattern = os.path.expanduser(pattern)  # A ~ no shell expanded (--config.data.train=~/x).
  if '://' in pattern:
    directory, _, name = pattern.rpartition('/')
    files = sorted(str(p) for p in epath.Path(directory).glob(name))
  elif os.path.isfile(pattern):
    files = [pattern]
  else:
    files = sorted(glob.glob(pattern))
  if not files:
    raise DataError(f'no data file matches {pattern!r}')
  return files


def read_records(pattern, on_error='raise'):
  """Records from the files matching `pattern`: .jsonl / .jsonl.gz (a JSON object per line),
  .csv / .tsv (a header line, then a record per row) or .txt (one file = one {'text'} record).
  Bad records stop the read naming file:line, or with on_error='skip' are left out and listed in
  the result's `skipped`."""
  records = Records()
  for path in _files(pattern):
    reader = next((r for ext, r in READERS.items() if path.endswith(ext)), None)
    if reader is None:
      raise DataError(f'{path}: unsupported file type (use {", ".join(READERS)})')
    start, bad = len(records), len(records.skipped)
    try:
      records += reader(path, on_error, records.skipped)
    except OSError as e:  # A directory named like a data file, a file without read permission.
      raise DataError(f'{path}: unreadable: {e.strerror or e}') from None
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
  held = np.zeros(len(records), bool)
  held[np.random.default_rng(seed).permutation(len(records))[:n]] = True
  rest = records.take(np.flatnonzero(~held))
  rest.skipped = records.skipped  # Listed once, with the split they were read for.
  return rest, records.take(np.flatnonzero(held))


def _plain(value, where, name):
  """A TFDS / datasets feature value as a .jsonl record would hold it (text as str)."""
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError as e:
      raise RecordError(f'{where}: field {name!r}: invalid UTF-8 at byte {e.start}') from None
  if isinstance(value, np.generic):
    return value.item()
  return value.tolist() if isinstance(value, np.ndarray) else value


def _tfds_source(name, given, default, data_cfg):
  """A TFDS split (`given`, else `default`) as a random-access source (array_record data; no
  TensorFlow needed)."""
  split = given or default
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f'tfds:{name} needs tensorflow-datasets: pip install jaxft[tfds]') from None
  where = f'tfds:{name}:{split} (data.tfds_data_dir={data_cfg.tfds_data_dir!r})'
  try:  # Never downloads: preparing a dataset is a step of its own, not a side effect of a run.
    return tfds.data_source(name, split=split, download=False,  # (~: as for data files.)
                            data_dir=os.path.expanduser(data_cfg.tfds_data_dir) or None)
  except NotImplementedError:  # Not prepared there, or prepared as TFRecord only.
    given_dir = f' --data_dir={data_cfg.tfds_data_dir}' if data_cfg.tfds_data_dir else ''
    raise DataError(f'{where}: not prepared as array_record there (jaxft reads it by random '
                    f'access and does not download it): tfds build {name} '
                    f'--file_format=array_record{given_dir}') from None
  except (tfds.core.registered.DatasetNotFoundError, ValueError, KeyError) as e:
    raise DataError(f'{where}: {type(e).__name__}: {str(e).strip().splitlines()[0]}') from None


def _hf_source(path, given, default, data_cfg):
  """A Hugging Face `datasets` split (`given`, else `default`) of a hub name, a local dir of data
  files or a DatasetDict written by save_to_disk; or one Dataset written by save_to_disk, read
  whole (a split given must be its own)."""
  split = given or default
  try:
    import datasets
  except ImportError:
    raise DataError(f'hf:{path} needs the datasets package: pip install jaxft[datasets]') from None
  try:
    if (epath.Path(path) / 'dataset_dict.json').is_file():
      return datasets.load_from_disk(path)[split]
    if (epath.Path(path) / 'state.json').is_file():  # One saved Dataset: a split of its own.
      ds = datasets.load_from_disk(path)
      if given and given != str(ds.split):
        raise DataError(f'hf:{path}:{given}: the directory holds one saved Dataset (split '
                        f'{ds.split and str(ds.split)!r}), not a DatasetDict: give it as hf:{path}')
      return ds
    return datasets.load_dataset(path, data_cfg.hf_name or None, split=split)
  except DataError:
    raise
  except (OSError, ValueError, KeyError, datasets.exceptions.DatasetNotFoundError) as e:
    raise DataError(f'hf:{path}:{split}: {type(e).__name__}: '
                    f'{str(e).strip().splitlines()[0] if str(e).strip() else "not found"}') from None


SOURCES = {'tfds': _tfds_source, 'hf': _hf_source}


def _dataset_spec(spec):
  """(kind, name, split given or '') of `tfds:<name>[:<split>]` or `hf:<name or dir>[:<split>]`
  (hf:~/dir is the home directory's: no shell expands a ~ after '='), or None for a file glob."""
  kind, _, rest = spec.partition(':')
  if kind not in SOURCES or not rest:
    return None
  name, _, given = rest.partition(':')
  return kind, os.path.expanduser(name) if kind == 'hf' else name, given


def read_split(spec, split, data_cfg):
  """Records of data.train / val / test: a file glob (see read_records), or a dataset split,
  `tfds:<name>[/<config>][:<split>]` or `hf:<hub name or local dir>[:<split>]` (the split
  defaulting to `split`) as SourceRecords named '<kind>:<name>:<split>[<index>]'."""
  parsed = _dataset_spec(spec)
  if parsed is None:
    return read_records(spec, data_cfg.on_error)
  kind, name, given = parsed
  source = SOURCES[kind](name, given, split, data_cfg)
  split = given or split
  if not len(source):
    raise DataError(f'{kind}:{name}:{split} holds no records')
  return SourceRecords(source, f'{kind}:{name}:{split}')


def _origins(spec, split, data_cfg):
  """What data.train / val / test `spec` reads, as (origin, slice) pairs: its files' real paths,
  or '<kind>:<name>:<split>' and the split's slice ('[:10%]', '' for all of it) for each split
  joined by '+' (a local dir by its real path; one saved HF Dataset is read whole, whatever the
  split)."""
  parsed = _dataset_spec(spec)
  if parsed is None:
    return {(f if '://' in f else os.path.realpath(f), '') for f in _files(spec)}
  kind, name, given = parsed
  if kind == 'hf' and os.path.isdir(name):
    name = os.path.realpath(name)
    if os.path.isfile(os.path.join(name, 'state.json')):
      return {(f'hf:{name}', '')}
  return {(f'{kind}:{name}:{base}', '[' + part if part else '')
          for base, _, part in (s.partition('[') for s in (given or split).split('+'))}


def _range(part):
  """A split's slice '[a:b]' or '[a%:b%]' as (start, stop, unit), or None for one that cannot be
  placed without the split's size (units mixed, counted back from its end) or other syntax."""
  m = re.fullmatch(r'\[(-?\d*)(%?):(-?\d*)(%?)\]', part)
  if not m or (m[1] and m[3] and m[2] != m[4]):
    return None
  unit = m[2] or m[4]
  start, stop = int(m[1] or 0), int(m[3]) if m[3] else math.inf
  if min(start, stop) < 0:
    if not unit:
      return None
    start, stop = (b + 100 if b < 0 else b for b in (start, stop))
  return start, stop, unit


def _overlap(a, b):
  """Whether slices `a` and `b` ('' for the whole) of one split may share records: True, False,
  or None where that cannot be told from them."""
  if not a or not b:
    return True
  ranges = _range(a), _range(b)
  if None in ranges or ranges[0][2] != ranges[1][2]:
    return None
  (start_a, stop_a, _), (start_b, stop_b, _) = ranges
  return max(start_a, start_b) < min(stop_a, stop_b)


def _check_disjoint(data_cfg):
  """Refuse a held-out split that reads data another split reads (a glob over the val file, the
  same file by two names, one saved Dataset twice, a slice of the train split): its figures would
  be measured on train data."""
  given = [(k, s) for k, s in (('train', 'train'), ('val', 'validation'), ('test', 'test'))
           if data_cfg[k]]
  origins = {k: _origins(data_cfg[k], s, data_cfg) for k, s in given}
  for i, (a, _) in enumerate(given):
    for b, _ in given[i + 1:]:
      both = [(x, _overlap(part_a, part_b), part_a, part_b)
              for x, part_a in origins[a] for y, part_b in origins[b] if x == y]
      if unsure := [f'{x}{part_a} vs {x}{part_b}' for x, o, part_a, part_b in both if o is None]:
        raise DataError(
            f'data.{a}={data_cfg[a]!r} and data.{b}={data_cfg[b]!r} read slices of one split '
            f'whose overlap cannot be told ({unsure[0]}): only [a:b] or [a%:b%] slices in one '
            f'unit (and no negative a:b) are compared; give them so')
      if shared := sorted({x for x, o, _, _ in both if o}):
        raise DataError(
            f'data.{a}={data_cfg[a]!r} and data.{b}={data_cfg[b]!r} both read '
            f'{", ".join(shared[:3])}{" ..." if len(shared) > 3 else ""}: held-out records must '
            f'be others (or leave data.{b} empty to hold out data.{b}_fraction of data.train)')


def load_splits(data_cfg):
  """{'train', 'val', 'test'} -> Records, from files / datasets or the demo generator, drawn
  (the demo corpus, the held-out fractions) by data.split_seed."""
  seed = data_cfg.split_seed
  if data_cfg.source == 'demo':
    given = [f'data.{k}={data_cfg[k]!r}' for k in ('train', 'val', 'test') if data_cfg[k]]
    if given:  # They would be ignored: a report or a run claiming other data than it used.
      raise DataError(f'{", ".join(given)} given, but data.source=demo reads no files: add '
                      f'--config.data.source=files')
    share = 1 / demo_data.BUCKETS
    other = [f'data.{k}={data_cfg[k]}' for k in ('val_fraction', 'test_fraction')
             if data_cfg[k] != share]
    if other:  # Ignored, they would let a run claim other splits than it used.
      raise DataError(f'{", ".join(other)} given, but data.source=demo holds out {share:.0%} of '
                      f'the questions for val and {share:.0%} for test (by a hash of each '
                      f'question): leave them at {share}, or write the corpus out (python -m '
                      f'jaxft.demo_data) and use data.source=files')
    parts = demo_data.splits(data_cfg.demo.num_examples, seed)
    return {s: Records((r, f'demo:{s}:{i}') for i, r in enumerate(rs)) for s, rs in parts.items()}
  if data_cfg.source != 'files':
    raise DataError(f"unknown data.source {data_cfg.source!r}; known: 'files', 'demo'")
  if not data_cfg.train:
    raise DataError('data.train is empty: give a data file or glob, tfds:<name> or hf:<name> '
                    '(or data.source=demo)')
  _check_disjoint(data_cfg)
  splits = {'train': read_split(data_cfg.train, 'train', data_cfg)}
  for offset, (name, split) in enumerate((('val', 'validation'), ('test', 'test')), 1):
    if data_cfg[name]:
      splits[name] = read_split(data_cfg[name], split, data_cfg)
    else:
      rest, held = _hold_out(splits['train'], data_cfg[f'{name}_fraction'], seed + offset, name)
      splits['train'], splits[name] = rest, held
  return splits


def process_rows(batch_size, process=None):
  """The rows of each global batch that this process (or `process`: (count, index)) holds."""
  count, index = process or (jax.process_count(), jax.process_index())
  if batch_size % count:
    raise DataError(f'global batch {batch_size} does not divide over {count} processes')
  per = batch_size // count
  return range(index * per, (index + 1) * per)


class Packer:
  """Places the segments of a stream of records next-fit into rows of `seq_len` tokens (each
  segment in a row of its own unless `pack`). `segments(k)` gives the k-th record's segments
  (token lists first) and its id, or None past the end. The position (record k, segment s) of
  the next segment to place is all the state there is."""

  def __init__(self, segments, seq_len, pack, num_records):
    self.segments, self.seq_len, self.pack, self.num_records = segments, seq_len, pack, num_records
    self.k, self.s, self._cached = 0, 0, None

  def _record(self, k):
    if self._cached is None or self._cached[0] != k:
      self._cached = (k, self.segments(k))
    return self._cached[1]

  def row(self):
    """The next row as [(segment, record id), ...]; [] once the records run out."""
    row, used, empty = [], 0, 0
    while (got := self._record(self.k)) is not None:
      segments, rid = got
      if self.s == len(segments):  # This record is placed (or gave nothing): on to the next.
        self.k, self.s = self.k + 1, 0
        empty = 0 if row else empty + 1
        if empty > self.num_records:
          raise DataError(f'{empty} records in a row gave no supervised example (the data has '
                          f'{self.num_records})')
        continue
      n = len(segments[self.s][0])
      if row and (not self.pack or used + n > self.seq_len):
        break
      row.append((segments[self.s], rid))
      used, self.s = used + n, self.s + 1
    return row


def fingerprint(records):
  """Which records these are, as 16 hex digits of a sha256: of their content when they are
  in memory, of the dataset split's spec and record indices when read as drawn."""
  digest = hashlib.sha256()
  if getattr(records, 'lazy', False):
    digest.update(records.spec.encode() + np.asarray(records.indices, np.int64).tobytes())
  else:
    for rec, _ in records:
      digest.update(json.dumps(rec, sort_keys=True, default=str).encode())
  return digest.hexdigest()[:16]


class TrainStream:
  """This process's rows of every global train batch, in an order fixed by (seed, records) alone.

  An endless seeded shuffle of the records (a fresh order every epoch) is dealt to the
  batch's row slots: slot j gets records order[j], order[j + B], order[j + 2B], ... and packs
  their segments next-fit into its rows, so step t's row j is slot j's t-th row. Nothing here
  depends on the mesh or on the objective's packing of other rows; each of P processes takes the
  slots [p*B/P, (p+1)*B/P) and tokenizes only the records dealt to them. Without packing (one
  example per row, as classification always is) step t holds exactly records order[tB:(t+1)B].

  `segments(records, i, dropped)` reads and tokenizes record i (appending to `dropped` if it has
  none to give); `arrays(rows)` turns rows of segments into example arrays. Batches also carry
  `record_ids` [rows, seq_len]: the record (index into `records`) of each token, -1 for padding.
  """

  def __init__(self, records, segments, arrays, seq_len, pack, batch_size, seed, process=None):
    """`process`: (count, index) to stand in for jax's (tests)."""
    if len(records) < batch_size:
      raise DataError(f'train split has {len(records)} records, fewer than one batch of '
                      f'{batch_size}')
    self.records, self.tokenize, self.arrays, self.seq_len = records, segments, arrays, seq_len
    self.key = {'seed': seed, 'batch_size': batch_size, 'records': len(records),
                'fingerprint': fingerprint(records)}
    self._epochs = {}  # epoch -> its permutation of the records (the few in use).
    self.slots = process_rows(batch_size, process)
    self.dropped = {j: 0 for j in self.slots}
    self.packers = {j: Packer(functools.partial(self._segments, j), seq_len, pack, len(records))
                    for j in self.slots}
    self.batches = 0

  def record_at(self, position):
    """The record at `position` of the endless stream. Epoch e (positions e*n .. e*n + n-1) is a
    permutation seeded by (seed, e), made in one numpy call: drawing a record by Grain's
    per-index shuffle took 46% of the input path's time."""
    epoch, i = divmod(position, len(self.records))
    if epoch not in self._epochs:
      if len(self._epochs) >= 4:
        del self._epochs[min(self._epochs)]
      self._epochs[epoch] = np.random.default_rng([self.key['seed'], epoch]).permutation(
          len(self.records))
    return int(self._epochs[epoch][i])

  def _segments(self, j, k):
    i = self.record_at(j + k * self.key['batch_size'])
    dropped = []
    segments = self.tokenize(self.records, i, dropped)
    self.dropped[j] += len(dropped)
    return segments, i

  def __iter__(self):
    return self

  def __next__(self):
    rows = [self.packers[j].row() for j in self.slots]
    batch = self.arrays([[segment for segment, _ in row] for row in rows])
    ids = np.full((len(rows), self.seq_len), -1, np.int32)
    for r, row in enumerate(rows):
      at = 0
      for segment, i in row:
        ids[r, at:at + len(segment[0])] = i
        at += len(segment[0])
    self.batches += 1
    return {**batch, 'record_ids': ids}

  def get_state(self):
    """The position of every slot (gathered from all processes): [slot, record k, segment s,
    records dropped]. Every process must call it at the same step."""
    local = np.array([[j, p.k, p.s, self.dropped[j]] for j, p in self.packers.items()], np.int32)
    if jax.process_count() > 1:
      local = multihost_utils.process_allgather(local, tiled=True)
    return {**self.key, 'batches': self.batches, 'slots': local.tolist()}

  def set_state(self, state):
    """Resume at a saved position (saved by any number of processes)."""
    # (A checkpoint from before the fingerprint existed is compared on the rest.)
    diffs = [f'{k} {state[k]!r} vs {v!r}' for k, v in self.key.items()
             if k in state and state[k] != v]
    if diffs:
      raise DataError(f'the checkpoint\'s data position is for other train data (checkpoint vs '
                      f'this run: {", ".join(diffs)}): the data order cannot carry over (resume '
                      f'with the saved config.json and data, or start a new workdir with '
                      f'train.init_from)')
    slots = {j: (k, s, d) for j, k, s, d in state['slots']}
    for j, packer in self.packers.items():
      packer.k, packer.s, self.dropped[j] = slots[j]
    self.batches = state['batches']


def eval_batches(examples, batch_size, max_batches=0):
  """This host's rows of fixed-size batches over a split, in order; the last batch is padded with
  rows whose loss mask is zero so every batch shards the same way."""
  n = len(next(iter(examples.values())))
  num = -(-n // batch_size)
  if max_batches:
    num = min(num, max_batches)
  rows = process_rows(batch_size)
  rows = slice(rows.start, rows.stop)
  for b in range(num):
    idx = np.arange(b * batch_size, (b + 1) * batch_size)
    real = idx < n
    batch = {k: v[np.where(real, idx, 0)] for k, v in examples.items()}
    batch['loss_mask'] = batch['loss_mask'] * real.reshape((-1,) + (1,) * (batch['loss_mask'].ndim - 1))
    yield {k: v[rows] for k, v in batch.items()}
