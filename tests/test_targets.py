"""Targets: spec parsing, the libtpu hint, TPU-vs-CPU per-chip FLOPs, and the HBM fit verdict.

Tests that compile for a TPU topology need libtpu (`pip install 'litejax[tpu]'`) and skip without it.
"""
import pytest

from litejax.perf import chips as hardware
from litejax.analysis import per_chip, targets
from litejax.config import load_config

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

needs_libtpu = pytest.mark.skipif(targets.libtpu_version() is None,
                                  reason="libtpu not installed (pip install 'litejax[tpu]')")

# tiny.yaml cut to one layer and 32 positions: the same sharding rules, a few-second TPU compile.
SMALL = ['model.num_layers=1', 'model.seq_len=32']
# One MoE layer whose f32 experts hold 80.5 GB: 12800 experts x 3 x 512 x 1024 parameters x 4 bytes,
# split over every device (mesh.expert = -1). 20.1 GB per chip on 4 chips, 10.1 GB on 8. Experts are
# narrow (h = 1024) so the gathered expert weights (temporaries) stay well under a GB.
HUGE = ['model.d_model=512', 'model.num_layers=1', 'model.seq_len=32', 'model.num_heads=4',
        'model.num_kv_heads=4', 'moe.num_tiers=1', 'moe.groups_per_tier=16', 'moe.experts_per_group=800',
        'moe.k_tier=1', 'moe.k_group=1', 'moe.k_expert=2', 'moe.d_expert=1024', 'moe.expert_kind=glu',
        'mesh.data=1', 'mesh.expert=-1']


def test_parse_target():
  assert targets.parse_target('v5p:8x8x8') == ('v5p', (8, 8, 8))
  assert targets.parse_target('v5e:16x16') == ('v5e', (16, 16))
  assert targets.parse_target('cpu:8') == ('cpu', (8,))
  for bad in ('v5p:8x8', 'v5e:4x4x4', 'tpu:8', 'v5p', 'cpu:0'):
    with pytest.raises(targets.TargetError):
      targets.parse_target(bad)


def test_missing_libtpu_names_the_install(monkeypatch):
  monkeypatch.setattr(targets, 'libtpu_version', lambda: None)
  with pytest.raises(targets.TargetError) as e:
    targets.resolve('v5p:2x2x2')
  msg = str(e.value)
  assert "pip install 'litejax[tpu]'" in msg and 'libtpu==' in msg


def test_hardware_table_is_cited():
  for gen, chip in hardware.CHIPS.items():
    for field in ('hbm_bytes', 'hbm_bytes_per_s', 'peak_flops', 'ici_bytes_per_s'):
      assert getattr(chip, field) > 0
      assert 'cloud.google.com/tpu/docs' in chip.sources[field], (gen, field)


def test_cpu_target_uses_emulated_devices():
  t = targets.resolve('cpu:4')
  assert len(t.devices) == 4 and t.chip is None


@needs_libtpu
@pytest.mark.parametrize('spec', ['v5e:2x2', 'v5p:2x2x2'])
def test_tpu_flops_match_cpu_mesh(spec):
  from litejax.analysis import bound as cost
  cfg = load_config('configs/tiny.yaml', SMALL)
  tpu = targets.resolve(spec)
  c, mesh = targets.target_mesh(cfg, tpu)
  tpu_flops = per_chip.per_device_cost(cost.compile_program(c, mesh=mesh))['flops']
  cpu = targets.resolve(f'cpu:{len(tpu.devices)}')
  c, mesh = targets.target_mesh(cfg, cpu)
  cpu_flops = per_chip.per_device_cost(cost.compile_program(c, mesh=mesh))['flops']
  assert tpu_flops == pytest.approx(cpu_flops, rel=0.01)


@needs_libtpu
def test_fit_verdicts():
  tiny = per_chip.compile_report(load_config('configs/tiny.yaml', SMALL), targets.resolve('v5e:2x2'))
  assert tiny['fit']['verdict'] == 'fits'
  assert tiny['latency']['total_s'] > 0
  huge = per_chip.compile_report(load_config('configs/tiny.yaml', HUGE), targets.resolve('v5e:2x2'))
  assert huge['fit']['verdict'] == 'does not fit'
  assert huge['memory_per_chip']['total'] > 20.1e9 > hardware.CHIPS['v5e'].hbm_bytes


@needs_libtpu
def test_tpu_report_compares_with_the_analytic_bound():
  """--target JSON carries ratio and flops_per_token_analytic, as the CPU report does; the compiled
  figure is the chip's cost_analysis (elementwise included, so a little above 1)."""
  rep = per_chip.compile_report(load_config('configs/tiny.yaml', SMALL), targets.resolve('v5p:2x2x1'))
  from litejax.model import bounds
  cfg = load_config('configs/tiny.yaml', SMALL)
  n = rep['tokens_per_group']
  analytic = sum(bounds.forward_flops_per_token(cfg, n).values())
  assert rep['flops_per_token_analytic'] == pytest.approx(analytic, rel=1e-9)
  assert rep['ratio'] == pytest.approx(rep['flops_per_token'] / analytic, rel=1e-9)
  elem = rep['flops_per_token_elementwise_estimate'] / analytic
  assert 0.97 <= rep['ratio'] <= 1.03 + cost_elementwise_share_bound(elem), rep['ratio']
  assert 'vs bound' in '\n'.join(per_chip.format_per_chip(rep))
  # The verdict judges the program's dots (the walker on the TPU HLO), which are the bound; the rest of
  # the compiled figure is named non-matmul work.
  from litejax.analysis import core
  m = rep['matmul']
  assert m['flops_per_token_analytic'] == pytest.approx(analytic, rel=1e-9)
  assert m['ratio'] == pytest.approx(1.0, rel=1e-9) and rep['violations'] == [] and rep['tol'] == 0.03
  assert m['flops_per_token_non_matmul'] == pytest.approx(rep['flops_per_token'] - m['flops_per_token_compiled'])
  m['by_component']['attention_proj']['compiled'] *= 1.5          # a component over its bound fails it
  m['flops_per_token_compiled'] += m['by_component']['attention_proj']['analytic'] / 2
  assert core.violations(m, 0.03)[0].startswith('matmul:')


def cost_elementwise_share_bound(elem_share: float) -> float:
  from litejax.analysis import core
  return core.ELEMENTWISE_FACTOR * elem_share


@needs_libtpu
def test_refused_program_reports_analytic_figures_and_prints():
  """configs/quadrillion.yaml on v5p:2x2x2: the TPU compiler refuses the forward (temporaries over HBM); the
  report is analytic, has nothing compiled to judge, and prints (a ratio of None was once formatted)."""
  rep = per_chip.compile_report(load_config('configs/quadrillion.yaml'), targets.resolve('v5p:2x2x2'))
  assert rep['compiled'] is False and rep['ratio'] is None and rep['violations'] == []
  assert rep['fit']['verdict'] == 'does not fit'
  lines = per_chip.format_per_chip(rep)
  assert 'the TPU compiler refused it: HLO temporaries need' in lines[0]
  assert not [line for line in lines if 'vs bound' in line or 'matmul' in line]
