"""Remote paths (gs://...) go through etils.epath, never os / glob / open: checked with epath's own
mock, which maps gs://bucket onto a local directory and records every call it serves."""
import gzip
import json
import shutil

import pytest
from etils import epath

from jaxft import checkpoint, config as config_lib, data, train


@pytest.fixture
def bucket(tmp_path):
  """gs://bucket/... served from tmp_path/bucket; yields the list of (call, gs path) made."""
  root, calls = str(tmp_path / 'bucket'), []

  def serve(name):
    def mocked(original, path, *args, **kwargs):
      assert str(path).startswith('gs://bucket'), path
      calls.append((name, str(path)))
      out = original(str(path).replace('gs://bucket', root), *args, **kwargs)
      return [o.replace(root, 'gs://bucket') for o in out] if name == 'glob' else out
    return mocked

  names = ('open', 'glob', 'exists', 'isdir', 'makedirs', 'mkdir', 'listdir', 'stat', 'remove')
  (tmp_path / 'bucket').mkdir()
  with epath.testing.mock_epath(**{n: serve(n) for n in names}):
    yield tmp_path / 'bucket', calls


def test_data_workdir_files_and_storage_check_on_gs(bucket, monkeypatch):
  root, calls = bucket
  (root / 'data').mkdir()
  with gzip.open(root / 'data' / 'a.jsonl.gz', 'wt') as f:
    f.write(json.dumps({'text': 'hello'}) + '\n' + json.dumps({'text': 'bye'}) + '\n')
  (root / 'data' / 'b.csv').write_text('text,label\nfine,1\n')
  records = data.read_records('gs://bucket/data/*.jsonl.gz') + data.read_records(
      'gs://bucket/data/b.csv')
  assert records == [({'text': 'hello'}, 'gs://bucket/data/a.jsonl.gz:1'),
                     ({'text': 'bye'}, 'gs://bucket/data/a.jsonl.gz:2'),
                     ({'text': 'fine', 'label': '1'}, 'gs://bucket/data/b.csv:2')]
  config_lib.write_file('gs://bucket/run', 'eval/val_5.json', '{"step": 5}')
  assert json.loads((root / 'run' / 'eval' / 'val_5.json').read_text()) == {'step': 5}
  # The storage preflight writes and removes a probe through epath; no free-space figure.
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: pytest.fail(f'disk_usage({path})'))
  checkpoint.check_storage('gs://bucket/run', 10 ** 15)
  assert ('remove', next(p for c, p in calls if c == 'open' and 'write-probe' in p)) in calls
  assert str(checkpoint.absolute('gs://bucket/run')) == 'gs://bucket/run'
  # metrics.jsonl cannot be appended to in an object store: it is rewritten whole, and a
  # resume keeps the lines up to the restored step.
  monkeypatch.setattr('tensorboardX.SummaryWriter', lambda *a, **k: type(
      'TB', (), {'add_scalar': lambda *a: None, 'flush': lambda s: None, 'close': lambda s: None})())
  log = train.MetricsLog('gs://bucket/run', 0)
  for step in (1, 2, 3):
    log.write(step, 'train', {'loss': 1.0 / step})
  log = train.MetricsLog('gs://bucket/run', 2)
  log.write(3, 'train', {'loss': float('nan')})
  lines = [json.loads(l) for l in (root / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['step'], l['loss']) for l in lines] == [(1, 1.0), (2, 0.5), (3, None)]
  assert all(p.startswith('gs://bucket/') for _, p in calls)
