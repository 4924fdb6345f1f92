"""Tokenizers: the built-in byte tokenizer, any Hugging Face tokenizer, and BPE training.

    tokenizer = 'bytes'                  UTF-8 bytes 0..255 + EOS + PAD, needs no files
    tokenizer = 'hf:<local dir or hub id>'  e.g. hf:gpt2 or a directory from `train` below

    python -m jaxft.tokenizer train --input 'data/*.jsonl' [--field text] --vocab-size 8000 --out tok/

The HF paths need the `hf` extra (transformers, tokenizers).
"""
import argparse
import hashlib
import json
import os

from jaxft.config import ConfigError

EOS_TOKEN = '<|endoftext|>'  # GPT-2's end of text (and start of text).
PAD_TOKEN = '<|pad|>'
TOKENIZER_FILES = ('tokenizer.json', 'vocab.json', 'tokenizer.model')  # Fast, BPE, sentencepiece.


class ByteTokenizer:
  """Byte-level tokenizer: id = byte value; 256 = end of text, 257 = padding."""
  eos_id = 256
  pad_id = 257
  vocab_size = 258
  spec = 'bytes'

  def encode(self, text):
    return list(text.encode('utf-8'))

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')


def is_path(name):
  """Whether an HF name can only be a local path, not a hub id ('name' or 'org/name'): './x',
  '/x', '~/x', 'tok/', 'a/b/c'."""
  return name.startswith(('.', '/', '~')) or name.endswith('/') or name.count('/') > 1


class HFTokenizer:
  """A transformers tokenizer behind jaxft's tokenizer interface. Text is encoded without added
  special tokens; padding uses the tokenizer's pad token, else its EOS (positions past a row's
  real tokens are masked anyway)."""

  def __init__(self, name):
    from transformers import AutoTokenizer
    self.spec = f'hf:{name}'
    name = os.path.expanduser(name)  # A ~ no shell expanded (--config.tokenizer=hf:~/tok).
    if not os.path.isdir(name) and is_path(name):
      raise FileNotFoundError(f'tokenizer=hf:{name}: no such directory')
    # Without its files transformers builds an empty tokenizer; say so instead.
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f))
                                       for f in TOKENIZER_FILES):
      raise FileNotFoundError(f'tokenizer=hf:{name}: no tokenizer files there (one of '
                              f'{", ".join(TOKENIZER_FILES)})')
    # Never run code shipped with a tokenizer (auto_map): only the tokenizers' own classes load.
    try:
      self.hf = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:  # A file cut short, files transformers cannot build from, no network.
      raise ConfigError(f'tokenizer=hf:{name} could not be loaded ({type(e).__name__}: '
                        f'{str(e).strip()})') from None
    if self.hf.eos_token_id is None:
      raise ConfigError(f'tokenizer {name} has no EOS token; jaxft ends documents with one')
    self.eos_id = self.hf.eos_token_id
    self.pad_id = self.eos_id if self.hf.pad_token_id is None else self.hf.pad_token_id
    self.vocab_size = len(self.hf)

  def encode(self, text):
    return self.hf(text, add_special_tokens=False)['input_ids']

  def decode(self, ids):
    return self.hf.decode(ids, skip_special_tokens=True)


# Text that two different tokenizers (of whatever vocab size) all but surely encode differently.
PROBE = ('The quick brown fox jumps over the lazy dog; 0123456789 +-*/= (x**2) café ü 日本 🙂\n'
         '\tdef f(self): return [1, 2] # The end of a sentence. And another one, then a question?')


def fingerprint(tok):
  """A digest of the ids `tok` gives PROBE and its EOS: two tokenizers of one fingerprint encode
  text alike, so embeddings trained with one mean the same tokens under the other. Saved with
  each checkpoint: a tokenizer retrained or replaced under the same name is caught on resume."""
  ids = json.dumps([tok.encode(PROBE), tok.eos_id]).encode()
  return hashlib.sha256(ids).hexdigest()[:16]


def build(name):
  if name == 'bytes':
    return ByteTokenizer()
  if name.startswith('hf:'):
    return HFTokenizer(name[3:])
  raise ConfigError(f"unknown tokenizer {name!r}; known: 'bytes', 'hf:<local dir or hub id>'")


def _fast(tokenizer_object, pad_token=None, **options):
  """A transformers fast tokenizer around a `tokenizers.Tokenizer`, GPT-2 special tokens."""
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, eos_token=EOS_TOKEN,
                                 bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=pad_token,
                                 **options)


def byte_tokenizer_as_hf():
  """The byte tokenizer as an HF tokenizer with the same ids: byte-level BPE over the 256 byte
  symbols with no merges, then EOS (256) and PAD (257)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  # ByteLevel shows byte b as the character bytes_to_unicode()[b]: give that symbol id b.
  vocab = {symbol: b for b, symbol in bytes_to_unicode().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
  # Text is bytes, whatever it spells: a literal '<|endoftext|>' in it is 13 byte ids, not EOS.
  return _fast(tok, pad_token=PAD_TOKEN, split_special_tokens=True)


def as_hf(tok):
  """An HF tokenizer that encodes like `tok` (for export)."""
  if isinstance(tok, ByteTokenizer):
    return byte_tokenizer_as_hf()
  return tok.hf


def train_bpe(files, vocab_size, out, field='text'):
  """Train a byte-level BPE (GPT-2 style) on the `field` of .jsonl records or .txt files and save
  it as an HF tokenizer directory (usable as tokenizer='hf:<out>')."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from jaxft import data, objectives
  records = [r for pattern in files for r in data.read_records(pattern)]
  texts = (objectives.string_field(rec, field, where) for rec, where in records)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer, length=len(records))
  _fast(tok).save_pretrained(out)
  return len(records), tok.get_vocab_size()


def main(argv):
  parser = argparse.ArgumentParser(prog='python -m jaxft.tokenizer')
  sub = parser.add_subparsers(dest='command', required=True)
  t = sub.add_parser('train', help='train a byte-level BPE tokenizer')
  t.add_argument('--input', nargs='+', required=True, help='.jsonl / .txt files or globs')
  t.add_argument('--field', default='text', help='JSONL field holding the text')
  t.add_argument('--vocab-size', type=int, required=True)
  t.add_argument('--out', required=True, type=os.path.expanduser,  # (--out=~/tok: no shell's ~.)
                 help='directory for the HF tokenizer files')
  t.add_argument('--force', action='store_true', help='replace a tokenizer already in --out')
  args = parser.parse_args(argv)
  if args.vocab_size <= 257:  # The 256 bytes and EOS come first; merges only above them.
    raise ConfigError(f'--vocab-size {args.vocab_size}: must be above 257 (256 bytes + EOS)')
  from jaxft import convert
  convert.check_out(args.out)  # (transformers would only log that it saved nothing.)
  held = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(args.out, f))]
  if held and not args.force:  # Runs trained with it would resume with other ids (refused).
    raise FileExistsError(f'--out {args.out} already holds a tokenizer ({", ".join(held)}): '
                          f'give another directory, or --force to replace it')
  n, vocab = train_bpe(args.input, args.vocab_size, args.out, args.field)
  print(f'trained a {vocab}-token byte-level BPE on {n} records -> {os.path.abspath(args.out)} '
        f"(use tokenizer='hf:{args.out}')")


if __name__ == '__main__':
  from jaxft import cli
  cli.run(main)
