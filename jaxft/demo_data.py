"""The embedded demo corpus: a tiny arithmetic language, generated deterministically, no downloads.

Every record serves every objective: `text` (next_token), `prompt` -> `completion` (labeled_pair)
and `label` (classification: the size of the answer, a rule the model must compute from the text).

    python -m jaxft.demo_data --out=demo_data   # writes train/val/test .jsonl to look at
"""
import argparse
import json
import os
import zlib

import numpy as np

from jaxft import config

LABEL_NAMES = ('low', 'mid', 'high')  # answer < 50, < 100, >= 100
BUCKETS = 20  # Questions hashed into 20 buckets: one is val, one test (5% each), the rest train.


def make_record(rng):
  a, b = (int(x) for x in rng.integers(0, 100, size=2))
  op = '+' if rng.random() < 0.5 else '-'
  if op == '-' and a < b:
    a, b = b, a
  c = a + b if op == '+' else a - b
  prompt = f'{a}{op}{b}='
  label = 0 if c < 50 else 1 if c < 100 else 2
  return {'text': prompt + str(c), 'prompt': prompt, 'completion': str(c), 'label': label}


def generate(num_examples, seed=0):
  """`num_examples` records, the same ones for the same seed on every machine."""
  rng = np.random.default_rng(seed)
  return [make_record(rng) for _ in range(num_examples)]


def split_of(record):
  """'train', 'val' or 'test' by a hash of the question: held-out questions never occur in train."""
  bucket = zlib.crc32(record['prompt'].encode()) % BUCKETS
  return 'val' if bucket == 0 else 'test' if bucket == 1 else 'train'


def splits(num_examples, seed=0):
  """{split: records}: ~90% train, ~5% val, ~5% test, disjoint questions."""
  out = {'train': [], 'val': [], 'test': []}
  for r in generate(num_examples, seed):
    out[split_of(r)].append(r)
  return out


def main(argv):
  parser = argparse.ArgumentParser(prog='python -m jaxft.demo_data',
                                   description='write the demo corpus as .jsonl files')
  parser.add_argument('--out', default='demo_data', help='directory for train/val/test.jsonl')
  out = os.path.expanduser(parser.parse_args(argv).out)  # (No shell expands --out=~/demo.)
  os.makedirs(out, exist_ok=True)
  for split, records in splits(20_000).items():  # Each file whole, or as it was (a Ctrl-C).
    config.write_file(out, f'{split}.jsonl', ''.join(json.dumps(r) + '\n' for r in records))
  print(f'wrote {out}/train.jsonl, val.jsonl, test.jsonl')


if __name__ == '__main__':
  from jaxft import cli
  cli.run(main)
