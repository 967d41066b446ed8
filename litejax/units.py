"""Numbers for people and sizes of dtypes: the one number formatter (SI prefixes) and the one dtype-size
table of litejax. Plain Python (no JAX, no NumPy): every layer may use it.

  si(1234567)          '1.23M'      a count, three significant digits, unit appended by the caller
                                    ('FLOPs/token', 'B/s': si(2.5e10) + 'B/s' is '25GB/s')
  si(9.57e10, 'B')     '95.7 GB'    with a unit: a space, then prefix and unit
  seconds(2.5e-5)      '25 us'      a duration, from seconds down to microseconds
  dtype_bytes('bf16')  2            bytes per element, by HLO name ('bf16', 's4') or JAX/NumPy name
                                    ('bfloat16', 'int4'); 4-bit integers are half a byte (packed, as
                                    TPUs store them)
"""
from __future__ import annotations

# Decimal SI prefixes, largest first (k is SI's kilo; 1e9 is G, never B).
_PREFIXES = (('E', 1e18), ('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3))

# Bytes per element. HLO names, then the names JAX, NumPy and the config use for the same dtypes.
DTYPE_BYTES: dict[str, float] = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'token': 0,
    'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 0.5, 'u4': 0.5,
    'bool': 1, 'int8': 1, 'uint8': 1, 'int16': 2, 'uint16': 2, 'float16': 2, 'bfloat16': 2,
    'int32': 4, 'uint32': 4, 'float32': 4, 'int64': 8, 'uint64': 8, 'float64': 8, 'complex64': 8,
    'complex128': 16, 'float8_e4m3fn': 1, 'float8_e5m2': 1, 'int4': 0.5, 'uint4': 0.5,
}


def si(n: float, unit: str = '') -> str:
  """`n` with an SI prefix and three significant digits: '1.23M'; with a unit, '95.7 GB'. Below 1000
  an integer prints whole ('512', '512 B')."""
  r = float(f'{n:.3g}')                   # rounded first: 999.9e6 is '1G', not '1e+03M'
  prefix, scale = next(((p, s) for p, s in _PREFIXES if abs(r) >= s), ('', 1.0))
  if prefix:
    num = f'{r / scale:.3g}'
  else:
    num = str(int(r)) if r.is_integer() else f'{r:.3g}'
  return f'{num}{prefix}' if not unit else f'{num} {prefix}{unit}'


def seconds(s: float) -> str:
  """A duration with a unit that keeps three significant digits readable: 1.2 s, 3.4 ms, 56 us."""
  if s >= 1:
    return f'{s:.3g} s'
  if s >= 1e-3:
    return f'{s * 1e3:.3g} ms'
  return f'{s * 1e6:.3g} us'


def dtype_bytes(dtype: str, default: float | None = None) -> float:
  """Bytes per element of a dtype named as HLO, JAX or NumPy name it (`str(array.dtype)` works). A name
  not in DTYPE_BYTES: `default` when given (an HLO reader counts 4), else ValueError."""
  size = DTYPE_BYTES.get(str(dtype), default)
  if size is None:
    raise ValueError(f'unknown dtype {dtype!r} (known: {sorted(DTYPE_BYTES)})')
  return size
