"""Text <-> tokens for a checkpoint: byte-level for litejax's own models, a Hugging Face `tokenizer.json`
for imported ones.

Where it is recorded: a file beside the checkpoints. `litejax import-hf` copies the model's tokenizer files
into `CKPT_DIR/tokenizer/` (Orbax lists only the numbered step folders, so it never sees them); a checkpoint
folder with `tokenizer/tokenizer.json` is read with the `tokenizers` package, any other is byte-level
(litejax.train.data.encode / decode, vocab 256). litejax's own checkpoints are unchanged.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Protocol

import numpy as np

from litejax.config import InputError
from litejax.train import data

TOKENIZER_DIR = 'tokenizer'
TOKENIZER_FILE = 'tokenizer.json'
# Files of a Hugging Face tokenizer copied on import and back on export (tokenizer.json is the one read).
TOKENIZER_FILES = (TOKENIZER_FILE, 'tokenizer_config.json', 'special_tokens_map.json')


class Tokenizer(Protocol):
  kind: str               # 'bytes' or 'hf'
  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` (unsigned ints)."""

  def decode(self, ids: Any) -> str:
    """The text of token ids."""


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocab 256): litejax's own models."""
  kind = 'bytes'
  vocab_size = data.VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    return data.encode(text)

  def decode(self, ids: Any) -> str:
    return data.decode(ids)


class HFTokenizer:
  """A Hugging Face fast tokenizer (`tokenizer.json`, read by the `tokenizers` package). `encode` adds the
  special tokens its post-processor adds (a BOS for Llama-style ones), as `AutoTokenizer(text)` does."""
  kind = 'hf'

  def __init__(self, path: str | pathlib.Path):
    from tokenizers import Tokenizer as _Tokenizer
    try:
      self._tok = _Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (the tokenizers package raises a bare Exception on a bad file)
      raise InputError(f'{path}: not a tokenizer.json the tokenizers package can read ({str(e)[:200]})') from None
    self.path = pathlib.Path(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, np.uint32)

  def decode(self, ids: Any) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def tokenizer_path(ckpt_dir: str | pathlib.Path) -> pathlib.Path:
  """Where a checkpoint folder's Hugging Face tokenizer.json lives (it may not exist)."""
  return pathlib.Path(ckpt_dir).expanduser() / TOKENIZER_DIR / TOKENIZER_FILE


def for_checkpoint(ckpt_dir: str | pathlib.Path | None) -> Tokenizer:
  """The tokenizer of a checkpoint folder: its tokenizer/tokenizer.json if it has one, else byte-level
  (also for None and remote folders)."""
  if ckpt_dir is None or '://' in str(ckpt_dir):
    return ByteTokenizer()
  path = tokenizer_path(ckpt_dir)
  return HFTokenizer(path) if path.is_file() else ByteTokenizer()


def text_encoder(ckpt_dir: str | pathlib.Path | None) -> Callable[[str], np.ndarray] | None:
  """How text data (litejax.train.data.load_tokens) is tokenized for the model of `ckpt_dir`: its tokenizer,
  or None for byte-level."""
  tok = for_checkpoint(ckpt_dir)
  return None if tok.kind == 'bytes' else tok.encode
