"""The device slot buffer (experts land in their slots bit-exactly, from pinned host memory) and the
int8 fallback copy's error bound."""
import jax
import numpy as np
import pytest

from litejax import jaxcompat
from litejax.inference.store import quant
from litejax.inference.store.slots import DeviceSlots, to_pinned_host

SHAPES = {'w_in': (4, 3), 'w_out': (3, 4)}


def experts(rng, n):
  return {name: rng.standard_normal((n, *s)).astype(np.float32) for name, s in SHAPES.items()}


def test_fetched_experts_land_in_their_slots_bit_exactly():
  rng = np.random.default_rng(0)
  slots = DeviceSlots(5, SHAPES, np.float32, load_width=3)
  want = {name: np.zeros((5, *s), np.float32) for name, s in SHAPES.items()}
  programs = []
  for idx in ([4, 1, 2], [0], [1, 3]):     # fewer than the width: the padding must be dropped
    x = experts(rng, len(idx))
    slots.load(idx, x)
    programs.append(jaxcompat.compiled_variants(slots._set))
    for name in want:
      want[name][idx] = x[name]
    for name, buf in slots.buffers.items():
      assert buf.sharding.memory_kind == 'device' and buf.shape == (5, *SHAPES[name])
      assert np.array_equal(np.asarray(buf), want[name]), (idx, name)
  got = slots.gather(jax.numpy.array([3, 4]))
  assert np.array_equal(np.asarray(got['w_out']), want['w_out'][[3, 4]])
  assert programs[0] == programs[-1]    # one program for every array, compiled once, whatever the slots


def test_staging_copy_is_in_pinned_host_memory():
  x = to_pinned_host(np.arange(6, dtype=np.float32))
  assert x.sharding.memory_kind == 'pinned_host' and np.array_equal(np.asarray(x), np.arange(6))


def test_load_rejects_bad_slots():
  slots = DeviceSlots(2, SHAPES, np.float32, load_width=2)
  with pytest.raises(ValueError, match=r'slots \[2\]: must be in \[0, 2\)'):
    slots.load([2], experts(np.random.default_rng(0), 1))
  with pytest.raises(ValueError, match='exceeds load_width 2'):
    slots.load([0, 1, 0], experts(np.random.default_rng(0), 3))


def test_int8_error_bound_per_row():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 16, 8)).astype(np.float32) * rng.uniform(0.01, 10, (3, 16, 1)).astype(np.float32)
  w[1, 2] = 0.0                              # an all-zero row quantises to zeros exactly
  q, scale = quant.quantize_int8(w)
  assert q.dtype == np.int8 and scale.shape == (3, 16, 1) and np.abs(q).max() == 127
  err = np.abs(quant.dequantize_int8(q, scale) - w)
  assert np.all(err <= scale / 2 * (1 + 1e-6))
  assert np.all(quant.dequantize_int8(q, scale)[1, 2] == 0)
  # The bound is tight enough to matter: relative error per row at most 1/254 of its max.
  assert np.max(err / np.abs(w).max(axis=-1, keepdims=True).clip(1e-30)) <= 1 / 254 + 1e-6
  assert quant.int8_bytes({'w_in': (16, 8)}) == 16 * 8 + 4 * 16
  assert set(quant.quantize_experts({'w_in': w})) == {'w_in'}
