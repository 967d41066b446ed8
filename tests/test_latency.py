"""The latency model against step times computed by hand, and the calibration's smoke run."""
import dataclasses

import pytest

from litejax.perf import chips as hardware, latency

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
  assert latency.format_estimate(est.as_dict()).endswith(f'dominated by {dominant}')


def test_v5p_step_from_its_datasheet():
  # v5p: 459 TFLOP/s bf16, 2765 GB/s HBM, 1200 GB/s ICI (litejax.perf.chips, cited). One step of
  # 4.59e14 FLOPs, 6e11 collective bytes and 5.53e12 HBM bytes: 1 s + 0.5 s + 2 s.
  d = latency.estimate(4.59e14, 6e11, 5.53e12, hardware.chip('v5p')).as_dict()
  assert [d[k] for k in ('compute_s', 'communication_s', 'memory_s', 'total_s')] == \
      pytest.approx([1.0, 0.5, 2.0, 3.5], rel=1e-12)
  assert d['dominant'] == 'memory'


def test_format_estimate_shares():
  # 0.3 + 0.2 + 0.1 = 0.6 s: 50%, 33%, 17%
  line = latency.format_estimate(latency.estimate(3e13, 5e10, 1e11, CHIP).as_dict())
  assert line == ('step time   600 ms = compute 300 ms (50%), communication 200 ms (33%), '
                  'memory 100 ms (17%); dominated by compute')


# The same chip with a per-kernel overhead of 2 us and transposes at 200 GB/s.
SLOW_KERNELS = dataclasses.replace(CHIP, kernel_overhead_s=2e-6, transpose_bytes_per_s=200e9)


def test_overhead_and_transpose_terms_by_hand():
  # 1e9 FLOPs / 1e14 = 10 us; 1e7 B of which 4e6 transposing: 6e6 / 1e12 + 4e6 / 2e11 = 6 + 20 = 26 us;
  # 500 kernels x 2 us = 1 ms: overhead dominates, as it does in a small decode step
  est = latency.estimate(1e9, 0.0, 1e7, SLOW_KERNELS, kernels=500, transpose_bytes=4e6)
  assert (est.compute_s, est.memory_s, est.overhead_s) == pytest.approx((1e-5, 2.6e-5, 1e-3), rel=1e-12)
  assert est.total_s == pytest.approx(1.036e-3, rel=1e-12)
  assert est.dominant == 'overhead' and est.kernels == 500
  d = est.as_dict()
  assert {'compute_s', 'communication_s', 'memory_s', 'total_s', 'dominant'} <= set(d)   # the old keys stay
  assert d['overhead_s'] == pytest.approx(1e-3) and d['kernels'] == 500
  # 10 us + 26 us + 1 ms = 1.036 ms: 1%, 0%, 3%, 97%
  assert latency.format_estimate(d) == (
      'step time   1.04 ms = compute 10 us (1%), communication 0 us (0%), memory 26 us (3%), '
      'overhead 1 ms (97%); dominated by overhead')
  # a chip without the figures (the TPUs): no overhead, transposes at the HBM bandwidth
  plain = latency.estimate(1e9, 0.0, 1e7, CHIP, kernels=500, transpose_bytes=4e6)
  assert (plain.memory_s, plain.overhead_s) == pytest.approx((1e-5, 0.0), rel=1e-12)
  assert hardware.chip('v5p').kernel_overhead_s == 0.0


def test_host_term_by_hand():
  # the same step plus 4 host calls at 70 us: 0.28 ms more, a term of its own (not the kernels')
  chip = dataclasses.replace(SLOW_KERNELS, call_overhead_s=70e-6)
  est = latency.estimate(1e9, 0.0, 1e7, chip, kernels=500, transpose_bytes=4e6, host_calls=4)
  assert est.host_s == pytest.approx(2.8e-4, rel=1e-12) and est.overhead_s == pytest.approx(1e-3, rel=1e-12)
  assert est.total_s == pytest.approx(1.036e-3 + 2.8e-4, rel=1e-12) and est.host_calls == 4
  d = est.as_dict()
  assert d['host_s'] == pytest.approx(2.8e-4) and d['host_calls'] == 4
  assert latency.format_estimate(d).endswith('overhead 1 ms (76%), host 280 us (21%); dominated by overhead')
  # without the chip's figure (the TPUs) the calls cost nothing; the default is no calls
  assert latency.estimate(1e9, 0.0, 1e7, SLOW_KERNELS, host_calls=4).host_s == 0.0
  assert latency.estimate(1e9, 0.0, 1e7, chip).host_s == 0.0
  assert hardware.chip('v5p').call_overhead_s == 0.0
  # dominant among five: 40 calls at 70 us = 2.8 ms > 1 ms of kernels
  assert latency.estimate(1e9, 0.0, 1e7, chip, kernels=500, host_calls=40).dominant == 'host'


@pytest.mark.parametrize('kwargs, match', [({'kernels': -1}, 'kernels'), ({'host_calls': -1}, 'host_calls'),
                                           ({'transpose_bytes': 2e7}, 'transpose_bytes')])
def test_estimate_rejects_bad_counts(kwargs, match):
  with pytest.raises(ValueError, match=match):
    latency.estimate(1e9, 0.0, 1e7, SLOW_KERNELS, **kwargs)


def _compiled(fn, *args):
  import jax
  return jax.jit(fn).lower(*args).compile()


def test_estimate_compiled_by_hand():
  import jax.numpy as jnp
  x, w = jnp.ones((8, 16), jnp.float32), jnp.ones((16, 32), jnp.float32)
  c = _compiled(lambda x, w: x @ w, x, w)
  e = latency.estimate_compiled(c, SLOW_KERNELS)
  # one dot, no loop: XLA's own figures. 2·8·16·32 FLOPs; x, w and the [8, 32] result, f32
  assert e['method'] == 'cost_analysis' and e['kernels'] == 1
  assert e['flops'] == 2 * 8 * 16 * 32 and e['bytes_accessed'] == 4 * (8 * 16 + 16 * 32 + 8 * 32)
  assert e['collective_bytes'] == 0.0 and e['transpose_bytes'] == 0.0
  assert e['compute_s'] == pytest.approx(8192 / 100e12) and e['overhead_s'] == pytest.approx(2e-6)
  assert e['memory_s'] == pytest.approx(e['bytes_accessed'] / 1e12)
  assert latency.estimate_compiled(c, SLOW_KERNELS, flops=1e12)['compute_s'] == pytest.approx(0.01)


def test_estimate_compiled_counts_loop_kernels_per_trip():
  import jax
  import jax.numpy as jnp
  from litejax.hlo import parse as hlo
  w = jnp.ones((16, 16), jnp.float32)

  def looped(trips):
    return _compiled(lambda x: jax.lax.fori_loop(0, trips, lambda i, x: jnp.tanh(x @ w), x), jnp.ones((4, 16)))

  c5, c9 = looped(5), looped(9)
  m5 = hlo.parse(c5.as_text())
  body = {n for n, t in m5.multiplicities(control_flow_only=True).items() if t == 5}
  per_trip = sum(hlo.launches_kernel(i) for n in body for i in m5[n].instrs.values())
  e5, e9 = latency.estimate_compiled(c5, SLOW_KERNELS), latency.estimate_compiled(c9, SLOW_KERNELS)
  assert e5['method'].startswith('HLO walker') and per_trip >= 2     # the body's dot/tanh and the condition
  assert e9['kernels'] - e5['kernels'] == 4 * per_trip
  # the walker counts the body's dot each trip: 2·4·16·16 FLOPs per trip
  assert e9['flops'] - e5['flops'] >= 4 * 2 * 4 * 16 * 16


def test_only_transposes_of_the_minor_dimension_are_priced_apart():
  # [b, s, h, d] -> [b, h, s, d] copies rows of d contiguous floats; -> [b, h, d, s] strides by element
  import jax.numpy as jnp
  x = jnp.ones((4, 16, 2, 8), jnp.float32)
  keep = _compiled(lambda x: jnp.transpose(x * 2.0, (0, 2, 1, 3)), x)
  move = _compiled(lambda x: jnp.transpose(x * 2.0, (0, 2, 3, 1)), x)
  assert latency.estimate_compiled(keep, SLOW_KERNELS)['transpose_bytes'] == 0.0
  e = latency.estimate_compiled(move, SLOW_KERNELS)
  assert e['transpose_bytes'] == e['bytes_accessed'] == 2 * 4 * x.size   # read and written, f32


def test_gather_and_sort_classes_by_hand():
  # 1e7 B: 2e6 gathered at 100 GB/s (20 us) + 8e6 streamed at 1 TB/s (8 us); 1e9 FLOPs (10 us) +
  # 1000 comparisons at 10 ns (10 us)
  chip = dataclasses.replace(CHIP, gather_bytes_per_s=100e9, sort_comparison_s=1e-8)
  est = latency.estimate(1e9, 0.0, 1e7, chip, gather_bytes=2e6, sort_comparisons=1000)
  assert (est.compute_s, est.memory_s) == pytest.approx((2e-5, 2.8e-5), rel=1e-12)
  # the TPU chips: gathers at HBM bandwidth, sorts not priced apart
  plain = latency.estimate(1e9, 0.0, 1e7, CHIP, gather_bytes=2e6, sort_comparisons=1000)
  assert (plain.compute_s, plain.memory_s) == pytest.approx((1e-5, 1e-5), rel=1e-12)
  with pytest.raises(ValueError, match='gather_bytes'):
    latency.estimate(1e9, 0.0, 1e7, chip, gather_bytes=6e6, transpose_bytes=5e6)
  with pytest.raises(ValueError, match='sort_comparisons'):
    latency.estimate(1e9, 0.0, 1e7, chip, sort_comparisons=-1)


def test_compiled_gathers_and_sorts_are_found():
  import jax.numpy as jnp
  w, i = jnp.ones((64, 8, 4), jnp.float32), jnp.zeros((3, 2), jnp.int32)
  g = latency.estimate_compiled(_compiled(lambda w, i: jnp.transpose(w[i], (0, 2, 1, 3)), w, i), SLOW_KERNELS)
  # the 3·2 gathered [8, 4] rows read and written, f32, and the 3·2 int32 indices (XLA's cost_analysis
  # counts the whole table in bytes_accessed); a gather is not also a transpose
  assert g['gather_bytes'] == 2 * 3 * 2 * 8 * 4 * 4 + 3 * 2 * 4 and g['transpose_bytes'] == 0.0
  srt = latency.estimate_compiled(_compiled(lambda x: jnp.sort(x, axis=-1), jnp.ones((4, 16))), SLOW_KERNELS)
  assert srt['sort_comparisons'] == 4 * 16 * 4 and srt['gather_bytes'] == 0.0   # rows x n log2 n


def test_call_overhead_from_the_probe():
  # synthetic: the probe's program as priced + 4 calls x 50 us comes back as 50 us per call
  from litejax.inference import decode
  from litejax.perf import probes as host_probes
  _, compiled = host_probes.call_probe(leaves=12)
  modelled = latency.estimate_compiled(compiled, SLOW_KERNELS)['total_s']
  assert decode.HOST_CALLS_PER_STEP == host_probes.CALL_PROBE_CALLS == 4   # the probe makes the loop's calls
  got = host_probes.call_overhead(compiled, modelled + 4 * 50e-6, SLOW_KERNELS)
  assert got == pytest.approx(50e-6, rel=1e-9)
  assert host_probes.call_overhead(compiled, 0.0, SLOW_KERNELS) == 0.0   # never negative


def test_kernel_overhead_from_two_chains():
  # synthetic times: each chain's modelled work + 2 us per kernel + a fixed 30 us per call; the
  # fixed cost cancels, the work is not counted twice: 2 us per kernel comes back
  from litejax.perf import probes as host_probes
  import jax.numpy as jnp
  w = jnp.ones((16, 16), jnp.float32)
  chains = [_compiled(lambda x, n=n: [x := jnp.cumsum(jnp.tanh(x @ w), -1) for _ in range(n)][-1], jnp.ones((4, 16)))
            for n in (2, 6)]
  points = []
  for c in chains:
    e = latency.estimate_compiled(c, CHIP)
    points.append((c, e['total_s'] + e['kernels'] * 2e-6 + 30e-6))
  assert host_probes.kernel_overhead(points, CHIP) == pytest.approx(2e-6, rel=1e-9)


@pytest.mark.slow
def test_calibrate_runs():
  from litejax.calibrate import calibration
  rep = calibration.calibrate(quick=True)
  host = rep['host']
  assert host['peak_flops'] > 0 and host['mem_bytes_per_s'] > 0 and host['transpose_bytes_per_s'] > 0
  assert host['kernel_overhead_s'] >= 0 and host['call_overhead_s'] > 0
  assert [r['name'] for r in rep['rows']] == list(calibration.QUICK_CONFIGS) + ['token-b1']
  assert rep['rows'][-1]['batch'] == 1 and rep['band'] == list(latency.TRUST_BAND)
  for r in rep['rows']:
    assert r['measured_s'] > 0 and r['compute_s'] > 0 and r['communication_s'] == 0.0 and r['kernels'] > 0
    assert r['host_calls'] == 1 and r['predicted_over_measured'] == pytest.approx(r['total_s'] / r['measured_s'])
  assert len(calibration.format_calibration(rep)) == 2 + len(rep['rows']) + 1


class _Program:
  """A compiled program as latency.estimate_compiled reads it: one kernel, and XLA's cost figures."""

  def __init__(self, flops: float, bytes_accessed: float):
    self.figures = {'flops': flops, 'bytes accessed': bytes_accessed}

  def as_text(self) -> str:
    return ('HloModule m\nENTRY %e (a: f32[4]) -> f32[4] {\n  %a = f32[4]{0} parameter(0)\n'
            '  ROOT %n = f32[4]{0} negate(%a)\n}\n')

  def cost_analysis(self) -> dict:
    return self.figures


def test_calibration_compares_hand_computed_predictions():
  # host: 100 GFLOP/s, 10 GB/s, 100 us per kernel, 1 ms per host call. One kernel and one call per step:
  #   'small' 2e9 FLOPs, 1e8 B: 20 ms + 10 ms + 0.1 ms + 1 ms = 31.1 ms, measured 31.1 ms -> 1.0
  #   'large' 8e9 FLOPs, 1e8 B: 80 ms + 10 ms + 0.1 ms + 1 ms = 91.1 ms, measured 45.55 ms -> 2.0
  from litejax.calibrate import calibration
  host = hardware.cpu_chip(1e11, 1e10, kernel_overhead_s=1e-4, call_overhead_s=1e-3)
  steps = {'small': (_Program(2e9, 1e8), 1, []), 'large': (_Program(8e9, 1e8), 1, ['model.d_model=512'])}
  rep = calibration.compare(steps, host, {'small': 31.1e-3, 'large': 45.55e-3})
  small, large = rep['rows']
  assert (small['compute_s'], small['memory_s'], small['overhead_s'], small['host_s']) == pytest.approx(
      (20e-3, 10e-3, 1e-4, 1e-3), rel=1e-12)
  assert small['total_s'] == pytest.approx(31.1e-3) and large['total_s'] == pytest.approx(91.1e-3)
  assert small['predicted_over_measured'] == pytest.approx(1.0) and large['predicted_over_measured'] == pytest.approx(2.0)
  assert small['dominant'] == large['dominant'] == 'compute' and large['overrides'] == ['model.d_model=512']
  assert rep['ranks_correctly'] and rep['within_2x'] and not rep['within_band']   # 2.0 is outside [0.67, 1.5]
  assert rep['geomean_ratio'] == pytest.approx(2 ** 0.5)
  assert not calibration.compare(steps, host, {'small': 1.0, 'large': 0.1})['ranks_correctly']


def test_measure_host_is_a_calibrated_chip():
  from litejax.perf.host import measure_host
  host = measure_host(repeats=1, quick=True)
  assert host.generation == 'cpu' and host.peak_flops > 0 and host.hbm_bytes_per_s > 0
  assert host.transpose_bytes_per_s > 0 and host.kernel_overhead_s >= 0 and host.call_overhead_s > 0
  assert host.gather_bytes_per_s > 0 and host.sort_comparison_s > 0
  rounds = []
  measure_host(repeats=2, quick=True, between=lambda: rounds.append(1))
  assert rounds == [1, 1]   # the caller's own timing runs once after each round of probes
