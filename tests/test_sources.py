"""Dataset sources besides files: a TFDS builder prepared inside the test (array_record, read
through tfds.data_source without TensorFlow) and Hugging Face `datasets` from local files and from
save_to_disk. No downloads."""
import json
import os

import pytest

from conftest import small_argv, small_config
from jaxft import data, train

ROWS = {split: [{'text': f'{i}+{i}=', 'label': i % 3} for i in range(start, start + n)]
        for split, start, n in (('train', 0, 40), ('validation', 100, 10), ('test', 200, 10))}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip('tensorflow_datasets')

  class JaxftTiny(tfds.core.GeneratorBasedBuilder):
    """Registered as 'jaxft_tiny' by its class name."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'text': tfds.features.Text(),
          'label': tfds.features.ClassLabel(names=['low', 'mid', 'high'])}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(rows) for split, rows in ROWS.items()}

    def _generate_examples(self, rows):
      for row in rows:
        yield row['text'], row

  directory = str(tmp_path_factory.mktemp('tfds'))
  JaxftTiny(data_dir=directory, file_format='array_record').download_and_prepare()
  return directory


def by_text(records):
  return sorted((r for r, _ in records), key=lambda r: r['text'])


def test_tfds_split_reads_as_plain_records(tfds_dir):
  cfg = small_config(data__tfds_data_dir=tfds_dir).data
  records = data.read_split('tfds:jaxft_tiny', 'validation', cfg)
  assert by_text(records) == by_text((r, '') for r in ROWS['validation'])  # str text, int label.
  assert all(w.startswith('tfds:jaxft_tiny:validation[') for _, w in records)
  assert len(data.read_split('tfds:jaxft_tiny:train[:25%]', 'train', cfg)) == 10  # TFDS slicing.
  with pytest.raises(data.DataError, match=r"tfds:jaxft_tiny:nope .*Unknown split 'nope'"):
    data.read_split('tfds:jaxft_tiny:nope', 'train', cfg)
  with pytest.raises(data.DataError, match=r'tfds:no_such_set:train .*Dataset no_such_set not found'):
    data.read_split('tfds:no_such_set', 'train', cfg)


def test_a_tilde_in_dataset_paths_is_the_home_directory(tfds_dir, hf_dirs, monkeypatch):
  """--config.data.tfds_data_dir=~/x and data.train=hf:~/x: no shell expands a ~ after '=', and
  TFDS / datasets looked for a directory literally named '~'."""
  home, tfds_sub = os.path.split(tfds_dir)
  monkeypatch.setenv('HOME', home)
  cfg = small_config(data__tfds_data_dir=f'~/{tfds_sub}').data
  assert len(data.read_split('tfds:jaxft_tiny', 'validation', cfg)) == len(ROWS['validation'])
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  files, saved, pairs = hf_dirs
  for directory in (files, saved):
    monkeypatch.setenv('HOME', os.path.dirname(directory))
    tilde = f'hf:~/{os.path.basename(directory)}'
    assert [r for r, _ in data.read_split(tilde, 'validation', cfg)] == pairs['validation']
    # The same directory's train split named two ways is still one source.
    both = small_config(data__source='files', data__train=tilde,
                        data__val=f'hf:{directory}:train').data
    with pytest.raises(data.DataError, match=rf'both read hf:{directory}:train'):
      data.load_splits(both)


def test_trains_classification_on_a_tfds_dataset(tfds_dir, tmp_path, capsys):
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, objective='classification', data__source='files',
                        data__train='tfds:jaxft_tiny', data__val='tfds:jaxft_tiny',
                        data__test='tfds:jaxft_tiny', data__tfds_data_dir=tfds_dir,
                        data__seq_len=16, train__steps=3))
  out = capsys.readouterr().out
  assert 'train (classification): 40 records, read, checked and tokenized as drawn' in out
  assert 'val (classification): 10 records -> 10 rows' in out
  summary = json.load(open(os.path.join(wd, 'summary.json')))
  assert sum(map(sum, summary['test']['confusion'])) == 10  # Every test record scored once.


def write_jsonl(directory, split, rows):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f'{split}.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  datasets = pytest.importorskip('datasets')
  root = tmp_path_factory.mktemp('hf')
  pairs = {split: [{'question': r['text'], 'answer': str(2 * int(r['text'].split('+')[0]))}
                   for r in rows] for split, rows in ROWS.items()}
  for split, rows in pairs.items():
    write_jsonl(root / 'files', split, rows)
  saved = str(root / 'saved')
  datasets.load_dataset(str(root / 'files')).save_to_disk(saved)
  return str(root / 'files'), saved, pairs


def test_hf_datasets_from_local_files_and_save_to_disk(hf_dirs, monkeypatch, tmp_path):
  import datasets
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  files, saved, pairs = hf_dirs
  cfg = small_config().data
  for spec in (f'hf:{files}', f'hf:{saved}'):
    records = data.read_split(spec, 'validation', cfg)
    assert [r for r, _ in records] == pairs['validation'], spec
    assert records[3][1] == f'{spec}:validation[3]'
  # One saved Dataset (not a DatasetDict) is read whole; a split named for it must be its own.
  one = str(tmp_path / 'one')
  datasets.Dataset.from_list(pairs['test']).save_to_disk(one)
  assert [r for r, _ in data.read_split(f'hf:{one}', 'validation', cfg)] == pairs['test']
  with pytest.raises(data.DataError, match=rf'hf:{one}:test: the directory holds one saved '
                     rf'Dataset \(split None\), not a DatasetDict: give it as hf:{one}$'):
    data.read_split(f'hf:{one}:test', 'train', cfg)
  # Nor can one source be both the train and a held-out split.
  both = small_config(data__source='files', data__train=f'hf:{files}', data__val=f'hf:{saved}',
                      data__test=f'hf:{files}:train').data
  with pytest.raises(data.DataError, match=rf"data.train='hf:{files}' and "
                     rf"data.test='hf:{files}:train' both read hf:{files}:train"):
    data.load_splits(both)
  # One saved Dataset is read whole for whichever split names it.
  twice = small_config(data__source='files', data__train=f'hf:{one}', data__val=f'hf:{one}').data
  with pytest.raises(data.DataError, match=rf"data.train='hf:{one}' and data.val='hf:{one}' "
                     rf"both read hf:{one}: held-out"):
    data.load_splits(twice)
  with pytest.raises(data.DataError, match=rf'hf:{files}:nope: ValueError: Unknown split "nope"'):
    data.read_split(f'hf:{files}:nope', 'train', cfg)
  with pytest.raises(data.DataError, match=r'hf:no-org/no-set:train: '):
    data.read_split('hf:no-org/no-set', 'train', cfg)


def test_trains_labeled_pair_on_hf_datasets_with_field_mapping(hf_dirs, tmp_path, capsys,
                                                               monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  files, saved, _ = hf_dirs
  wd = str(tmp_path / 'run')
  train.main(small_argv(wd, objective='labeled_pair', data__source='files',
                        data__train=f'hf:{saved}', data__val=f'hf:{files}',
                        data__test=f'hf:{files}', data__prompt_field='question',
                        data__completion_field='answer', train__steps=3))
  out = capsys.readouterr().out
  assert 'train (labeled_pair): 40 records' in out and 'test (labeled_pair): 10 records' in out
  assert json.load(open(os.path.join(wd, 'summary.json')))['test']['exact_match_examples'] == 10


def test_data_files_and_fractions_with_the_demo_source_are_refused_not_ignored():
  cfg = small_config(data__test='my_test.jsonl')
  assert cfg.data.source == 'demo'
  with pytest.raises(data.DataError, match=r"data.test='my_test.jsonl' given, but data.source=demo "
                     r"reads no files: add --config.data.source=files"):
    data.load_splits(cfg.data)
  cfg = small_config(data__val_fraction=0.2)
  with pytest.raises(data.DataError, match=r"data.val_fraction=0.2 given, but data.source=demo "
                     r"holds out 5% of the questions for val and 5% for test"):
    data.load_splits(cfg.data)
  parts = data.load_splits(small_config().data)  # The fractions it takes: what it holds out.
  sizes = {s: len(list(r)) for s, r in parts.items()}
  total = sum(sizes.values())
  assert all(abs(sizes[s] / total - 0.05) < 0.01 for s in ('val', 'test')), sizes
