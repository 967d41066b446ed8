"""`litejax plan`: the smallest slice where a config fits, checked against a hand computation."""
import pytest

from litejax import hardware, targets
from litejax import footprint, planning
from litejax.config import load_config
from test_targets import HUGE, SMALL

needs_libtpu = pytest.mark.skipif(targets.libtpu_version() is None,
                                  reason="libtpu not installed (pip install 'litejax[tpu]')")


def test_state_bytes_by_hand():
  # HUGE: 12800 experts x 3 x 512 x 1024 f32 = 80.53 GB of experts, split over the 8 expert ranks.
  cfg = load_config('configs/tiny.yaml', HUGE)
  s = footprint.state_bytes_per_device(cfg, {'data': 1, 'expert': 8, 'tensor': 1}, train=False)
  experts = 12800 * 3 * 512 * 1024 * 4
  assert experts / 8 < s['params'] < experts / 8 * 1.01
  t = footprint.state_bytes_per_device(cfg, {'data': 1, 'expert': 8, 'tensor': 1}, train=True)
  assert t['state'] == pytest.approx(3 * s['params'])


@needs_libtpu
def test_plan_finds_the_hand_computed_slice():
  # Forward on v5e (16 GB per chip): 80.5 GB of experts is 20.1 GB per chip on 2x2 (does not fit),
  # 10.1 GB on 2x4 (fits): the answer is v5e:2x4.
  out = planning.smallest_slice(load_config('configs/tiny.yaml', HUGE), 'v5e', train=False)
  assert out['answer'] == 'v5e:2x4'
  assert [r['verdict'] for r in out['tried']] == ['does not fit', 'fits']
  assert out['per_chip']['latency']['total_s'] > 0


@needs_libtpu
def test_plan_small_training_step_fits_smallest_slice():
  out = planning.smallest_slice(load_config('configs/tiny.yaml', SMALL), 'v5p', train=True)
  assert out['answer'] == 'v5p:' + hardware.SLICES['v5p'][0]


def test_plan_reports_shortfall_without_compiling():
  # The quadrillion config's state overflows every v5p slice already in the sharding arithmetic.
  out = planning.smallest_slice(load_config('configs/quadrillion.yaml'), 'v5p', train=True)
  assert out['answer'] is None
  assert out['shortfall']['state_over_pod_hbm'] > 1
  assert all(r['verdict'] in ('does not fit', 'mesh does not divide') for r in out['tried'])
