"""litejax.units: the one number formatter (SI prefixes) and the one dtype-size table."""
import pytest

from litejax import units


def test_si_prefixes():
  assert units.si(1234567) == '1.23M'
  assert units.si(2.5e10) + 'B/s' == '25GB/s'          # 1e9 is G (the old formatter wrote 'BB/s')
  assert units.si(1.5e3) == '1.5k' and units.si(2e15) == '2P' and units.si(3e18) == '3E'
  assert units.si(512) == '512' and units.si(0.25) == '0.25' and units.si(-2e6) == '-2M'
  assert units.si(999.96e6) == '1G'                     # rounded before the prefix is chosen


def test_si_with_a_unit():
  assert units.si(9.57e10, 'B') == '95.7 GB'
  assert units.si(112e9, 'B') == '112 GB' and units.si(512, 'B') == '512 B' and units.si(1500, 'B') == '1.5 kB'


def test_seconds():
  assert [units.seconds(s) for s in (2.0, 3.4e-3, 5.6e-5)] == ['2 s', '3.4 ms', '56 us']


def test_dtype_bytes_by_hlo_and_numpy_names():
  assert units.dtype_bytes('bf16') == units.dtype_bytes('bfloat16') == 2
  assert units.dtype_bytes('f32') == units.dtype_bytes('float32') == 4
  assert units.dtype_bytes('s4') == units.dtype_bytes('int4') == 0.5
  with pytest.raises(ValueError, match='unknown dtype'):
    units.dtype_bytes('f8e9')
  assert units.dtype_bytes('f8e9', default=4) == 4
