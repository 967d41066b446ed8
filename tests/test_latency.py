"""The latency model against step times computed by hand, and the calibration's smoke run."""
import pytest

from litejax import bounds, hardware, latency

# A made-up chip with round numbers, so every term below is checked against arithmetic done by hand:
# 100 TFLOP/s, 1 TB/s of HBM bandwidth, 250 GB/s of ICI.
CHIP = hardware.Chip('test', 'test', hbm_bytes=16e9, hbm_bytes_per_s=1e12, peak_flops=100e12,
                     ici_bytes_per_s=250e9, max_chips=1, torus_dims=2)


@pytest.mark.parametrize('flops, coll, hbm, expected, dominant', [
    # 3e13 FLOPs / 1e14 FLOP/s = 0.3 s; 5e10 B / 2.5e11 B/s = 0.2 s; 1e11 B / 1e12 B/s = 0.1 s
    (3e13, 5e10, 1e11, (0.3, 0.2, 0.1), 'compute'),
    # 1e12 / 1e14 = 0.01 s; 1e11 / 2.5e11 = 0.4 s; 2e11 / 1e12 = 0.2 s
    (1e12, 1e11, 2e11, (0.01, 0.4, 0.2), 'communication'),
    # no collectives: 2e12 / 1e14 = 0.02 s; 0; 5e11 / 1e12 = 0.5 s
    (2e12, 0.0, 5e11, (0.02, 0.0, 0.5), 'memory'),
])
def test_estimate_by_hand(flops, coll, hbm, expected, dominant):
  est = latency.estimate(flops, coll, hbm, CHIP)
  assert (est.compute_s, est.communication_s, est.memory_s) == pytest.approx(expected, rel=1e-12)
  assert est.total_s == pytest.approx(sum(expected), rel=1e-12)
  assert est.dominant == dominant
  assert latency.format_estimate(est.as_dict(), bounds.human).endswith(f'dominated by {dominant}')


def test_v5p_step_from_its_datasheet():
  # v5p: 459 TFLOP/s bf16, 2765 GB/s HBM, 1200 GB/s ICI (litejax.hardware, cited). One step of
  # 4.59e14 FLOPs, 6e11 collective bytes and 5.53e12 HBM bytes: 1 s + 0.5 s + 2 s.
  d = latency.estimate(4.59e14, 6e11, 5.53e12, hardware.chip('v5p')).as_dict()
  assert [d[k] for k in ('compute_s', 'communication_s', 'memory_s', 'total_s')] == \
      pytest.approx([1.0, 0.5, 2.0, 3.5], rel=1e-12)
  assert d['dominant'] == 'memory'


def test_format_estimate_shares():
  # 0.3 + 0.2 + 0.1 = 0.6 s: 50%, 33%, 17%
  line = latency.format_estimate(latency.estimate(3e13, 5e10, 1e11, CHIP).as_dict(), bounds.human)
  assert line == ('step time   600 ms = compute 300 ms (50%), communication 200 ms (33%), '
                  'memory 100 ms (17%); dominated by compute')


def test_calibrate_runs():
  rep = latency.calibrate(quick=True)
  assert rep['host']['peak_flops'] > 0 and rep['host']['mem_bytes_per_s'] > 0
  assert [r['name'] for r in rep['rows']] == list(latency.QUICK_CONFIGS)
  for r in rep['rows']:
    assert r['measured_s'] > 0 and r['compute_s'] > 0 and r['communication_s'] == 0.0
    # the prediction is the model applied to the row's own figures and the measured host
    assert r['compute_s'] == pytest.approx(r['flops'] / rep['host']['peak_flops'], rel=1e-12)
    assert r['memory_s'] == pytest.approx(r['bytes_accessed'] / rep['host']['mem_bytes_per_s'], rel=1e-12)
