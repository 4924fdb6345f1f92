"""Tokenizers. `bytes` is built in: UTF-8 bytes 0..255 plus EOS and PAD, no files needed."""


class ByteTokenizer:
  """Byte-level tokenizer: id = byte value; 256 = end of text, 257 = padding."""
  eos_id = 256
  pad_id = 257
  vocab_size = 258

  def encode(self, text):
    return list(text.encode('utf-8'))

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')


def build(name):
  if name == 'bytes':
    return ByteTokenizer()
  raise ValueError(f"unknown tokenizer {name!r}; known: 'bytes'")
