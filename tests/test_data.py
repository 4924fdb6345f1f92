import json

import numpy as np
import pytest

from conftest import small_config
from jaxft import data, demo_data, objectives, tokenizer


def write(path, lines):
  path.write_text(''.join(l + '\n' for l in lines))
  return str(path)


def test_jsonl_and_txt_records_name_their_origin(tmp_path):
  f = write(tmp_path / 'a.jsonl', [json.dumps({'text': 'hello'}), '', json.dumps({'text': 'bye'})])
  (tmp_path / 'b.txt').write_text('a whole document\nwith lines')
  recs = data.read_records(str(tmp_path / '*.jsonl')) + data.read_records(str(tmp_path / '*.txt'))
  assert [r['text'] for r, _ in recs] == ['hello', 'bye', 'a whole document\nwith lines']
  assert [w for _, w in recs] == [f'{f}:1', f'{f}:3', str(tmp_path / 'b.txt')]


def test_bad_input_errors_name_file_line_and_field(tmp_path):
  f = write(tmp_path / 'bad.jsonl', [json.dumps({'text': 'ok'}), '{"text": oops}'])
  with pytest.raises(data.DataError, match=rf'{f}:2: malformed JSON line'):
    data.read_records(f)
  g = write(tmp_path / 'nofield.jsonl', [json.dumps({'body': 'x'})])
  cfg = small_config()
  with pytest.raises(data.DataError, match=rf"{g}:1: missing field 'text' \(has: body\)"):
    objectives.get('next_token').encode(data.read_records(g), tokenizer.build('bytes'), cfg.data)
  with pytest.raises(data.DataError, match="no data file matches"):
    data.read_records(str(tmp_path / 'missing*.jsonl'))


def test_holdout_splits_are_disjoint_and_seeded(tmp_path):
  f = write(tmp_path / 'd.jsonl', [json.dumps({'text': f'doc {i}'}) for i in range(100)])
  cfg = small_config(data__source='files', data__train=f, data__val_fraction=0.1,
                     data__test_fraction=0.2)
  s1, s2 = data.load_splits(cfg.data, 0), data.load_splits(cfg.data, 0)
  names = {k: [r['text'] for r, _ in v] for k, v in s1.items()}
  assert (len(names['train']), len(names['val']), len(names['test'])) == (72, 10, 18)
  assert len(set(sum(names.values(), []))) == 100
  assert names == {k: [r['text'] for r, _ in v] for k, v in s2.items()}
  assert names != {k: [r['text'] for r, _ in v] for k, v in data.load_splits(cfg.data, 1).items()}


def test_demo_splits_hold_out_questions():
  parts = demo_data.splits(3000)
  train_q = {r['prompt'] for r in parts['train']}
  assert parts['val'] and parts['test']
  assert not train_q & {r['prompt'] for r in parts['val'] + parts['test']}
  r = parts['train'][0]
  assert r['text'] == r['prompt'] + r['completion'] and r['label'] in (0, 1, 2)
  assert eval(r['prompt'][:-1]) == int(r['completion'])  # The answers are right.
  assert demo_data.generate(50, seed=3) == demo_data.generate(50, seed=3)


def test_grain_iterator_resumes_at_saved_position():
  ex = {'tokens': np.arange(40).reshape(20, 2), 'targets': np.arange(40).reshape(20, 2),
        'loss_mask': np.ones((20, 2))}
  ds = data.train_dataset(ex, 4, seed=0)
  it = iter(ds)
  first = [next(it)['tokens'] for _ in range(7)]  # Crosses an epoch boundary (5 batches/epoch).
  state = it.get_state()
  rest = [next(it)['tokens'] for _ in range(4)]
  again = iter(ds)
  again.set_state(state)
  np.testing.assert_array_equal(np.stack([next(again)['tokens'] for _ in range(4)]), np.stack(rest))
  epoch1 = np.sort(np.concatenate(first[:5]).ravel())
  np.testing.assert_array_equal(epoch1, np.arange(40))  # Each epoch sees every example once.
  assert not np.array_equal(np.concatenate(first[:5]), np.concatenate(first[5:7] + rest[:3]))


def test_eval_batches_pad_with_masked_rows():
  ex = {'tokens': np.ones((10, 3), np.int32), 'targets': np.ones((10, 3), np.int32),
        'loss_mask': np.ones((10, 3), np.float32)}
  batches = list(data.eval_batches(ex, 4))
  assert len(batches) == 3 and all(b['tokens'].shape == (4, 3) for b in batches)
  assert sum(b['loss_mask'].sum() for b in batches) == 30
