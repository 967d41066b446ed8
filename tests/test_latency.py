"""The latency model: terms add up, the dominant term is named, and calibration runs."""
from litejax import bounds, hardware, latency


def test_terms_add_up():
  chip = hardware.chip('v5p')
  est = latency.estimate(flops=459e12, collective_bytes=600e9, bytes_accessed=2765e9 * 3, chip=chip)
  assert est.compute_s == 1.0
  assert est.communication_s == 0.5
  assert est.memory_s == 3.0
  assert est.total_s == est.compute_s + est.communication_s + est.memory_s
  assert est.dominant == 'memory'
  d = est.as_dict()
  assert d['total_s'] == 4.5 and d['dominant'] == 'memory'
  assert 'dominated by memory' in latency.format_estimate(d, bounds.human)


def test_no_communication_term_without_collectives():
  est = latency.estimate(1e12, 0.0, 1e9, hardware.chip('v5e'))
  assert est.communication_s == 0.0 and est.dominant == 'compute'


def test_calibrate_runs():
  rep = latency.calibrate(quick=True)
  assert rep['host']['peak_flops'] > 0 and rep['host']['mem_bytes_per_s'] > 0
  assert len(rep['rows']) == len(latency.QUICK_CONFIGS)
  for r in rep['rows']:
    assert r['measured_s'] > 0 and r['total_s'] > 0
    assert abs(r['compute_s'] + r['memory_s'] - r['total_s']) < 1e-12
  assert latency.format_calibration(rep, bounds.human)
