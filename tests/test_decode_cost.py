"""`litejax bound --decode` (litejax.analysis.decode_bound): the decode step compiled from abstract shapes,
compiled FLOPs against bounds.decode_flops_per_token, expert weights read = the active rows' slices."""
import importlib.util
import json

import pytest

from litejax.model import bounds
from litejax import cli
from litejax.inference import decode
from litejax.analysis import decode_bound as decode_cost
from litejax.perf import latency
from litejax.config import load_config
from train_helpers import REPO, TINY_YAML

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow


def test_decode_bound_by_hand():
  cfg = load_config(TINY_YAML)
  f = bounds.decode_flops_per_token(cfg, 100)
  mc, m = cfg.model, cfg.moe
  hd = mc.d_model // mc.num_heads
  assert f['attention_scores'] == mc.num_layers * 4 * 100 * mc.num_heads * hd
  assert f['experts'] == mc.num_layers * m.k_active * 6 * mc.d_model * m.d_expert
  assert f['router_expert'] == mc.num_layers * 2 * mc.d_model * m.experts_total
  assert f['unembed'] == 2 * mc.d_model * mc.vocab_size
  assert bounds.decode_flops_per_token(cfg, 100, expert_rows=8)['experts'] == 2 * f['experts']
  with pytest.raises(ValueError, match='cache_len'):
    bounds.decode_flops_per_token(cfg, 0)


def test_bound_decode_json_one_token_per_device(capsys):
  # batch 1 on one device: matrix-vector dots, whose metadata XLA:CPU drops (attributed by weight).
  rc = cli.main(['bound', '--config', str(TINY_YAML), '--decode', '--batch', '1', '--cache-len', '32',
                 '--devices', '1', '--json'])
  rep = json.loads(capsys.readouterr().out)
  assert rc == 0 and rep['violations'] == []
  assert rep['decode'] is True and rep['batch'] == 1 and rep['cache_len'] == 32
  for name, row in rep['by_component'].items():
    if name != 'elementwise':
      assert row['compiled'] == pytest.approx(row['analytic'], rel=1e-9), name
  cfg = load_config(TINY_YAML)
  assert rep['flops_per_token_analytic'] == sum(bounds.decode_flops_per_token(cfg, 32).values())
  # Weights read: the K active experts' slices per layer, a quarter of every expert here (4 of 16).
  active = cfg.model.num_moe_layers * cfg.moe.k_active * bounds.expert_params(cfg) * 4
  assert rep['expert_weight_bytes_per_token'] == active == rep['expert_weight_bytes_per_token_analytic']
  assert rep['expert_weight_bytes_all_experts'] == 4 * active
  lat = rep['latency']
  assert lat['dominant'] in latency.TERMS and lat['predicted_ms_per_token'] > 0
  # the per-kernel overhead term: kernels executed (loops x trip count) x the host's measured overhead
  assert lat['kernels'] > 0 and lat['overhead_s'] == pytest.approx(lat['kernels'] * rep['chip']['kernel_overhead_s'])
  # the host term: the decode loop's calls per step x the host's measured per-call overhead
  assert lat['host_calls'] == decode.HOST_CALLS_PER_STEP
  assert lat['host_s'] == pytest.approx(lat['host_calls'] * rep['chip']['call_overhead_s'])
  assert lat['total_s'] == pytest.approx(sum(lat[f'{t}_s'] for t in latency.TERMS))


def test_scanned_layers_read_only_the_active_rows():
  # The layer scan's dynamic-slice of the stacked [L, E, d, h] table is fused into the gather of K
  # rows (computed on demand): the rows are read, not the layer's table (hlo_cost.slice_reads).
  cfg = load_config(TINY_YAML, ['model.scan_layers=true'])
  rep = decode_cost.bound_decode(cfg, batch=2, cache_len=16, num_devices=1)
  assert rep['ratio'] == pytest.approx(1.0) and rep['violations'] == []
  assert rep['expert_weight_bytes_per_token'] == rep['expert_weight_bytes_per_token_analytic']
  assert rep['expert_weight_bytes_per_token'] < rep['expert_weight_bytes_all_experts']
  assert rep['expert_weight_bytes_per_token_cpu_bf16_upcast'] == 0


def test_scanned_bf16_upcast_is_a_named_cpu_artefact():
  # XLA:CPU converts each stacked bf16 expert table to f32 whole, hoisted out of the layer loop: it
  # reads every expert per step. Named as the artefact (a TPU compile keeps the tables bf16); the
  # rest is exactly the K rows' slices, so no violation.
  cfg = load_config(TINY_YAML, ['model.scan_layers=true', 'model.param_dtype=bfloat16', 'model.dtype=bfloat16'])
  rep = decode_cost.bound_decode(cfg, batch=2, cache_len=16, num_devices=1)
  upcast = rep['expert_weight_bytes_per_token_cpu_bf16_upcast']
  assert upcast >= rep['expert_weight_bytes_all_experts'] / rep['batch']      # the whole-table convert
  assert rep['expert_weight_bytes_per_token_without_artefacts'] == pytest.approx(
      rep['expert_weight_bytes_per_token_analytic'])
  assert rep['artefacts_per_token']['cpu_bf16_expert_table_upcast_bytes'] == upcast
  assert not [v for v in rep['violations'] if 'expert weights' in v]


def test_slice_reads_follows_chains_and_fails_on_a_whole_read():
  from litejax.hlo import parse as hlo, flops as hlo_cost
  text = """HloModule m
%f (p: f32[4,16,8], i: s32[], j: s32[2]) -> f32[2,8] {
  %p = f32[4,16,8]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,16,8]{2,1,0} dynamic-slice(%p, %i, %z, %z), dynamic_slice_sizes={1,16,8}
  %b = f32[16,8]{1,0} bitcast(%ds)
  %j = s32[2]{0} parameter(2)
  %jb = s32[2,1]{1,0} bitcast(%j)
  ROOT %g = f32[2,8]{1,0} gather(%b, %jb), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,8}
}
%h (p: f32[4,16,8], i: s32[]) -> f32[16,8] {
  %p = f32[4,16,8]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,16,8]{2,1,0} dynamic-slice(%p, %i, %z, %z), dynamic_slice_sizes={1,16,8}
  ROOT %n = f32[1,16,8]{2,1,0} negate(%ds)
}
ENTRY %e (a: f32[4,16,8]) -> f32[4,16,8] {
  ROOT %a = f32[4,16,8]{2,1,0} parameter(0)
}
"""
  m = hlo.parse(text)
  assert hlo_cost.slice_reads(m['f'], 'p') == 2 * 8 * 4          # the gathered rows
  assert hlo_cost.slice_reads(m['h'], 'p') == 16 * 8 * 4         # the slice, used whole
  assert hlo_cost.slice_reads(m['h'], 'ds') is None              # negate reads it whole


def test_cache_len_needs_decode(capsys):
  assert cli.main(['bound', '--config', str(TINY_YAML), '--cache-len', '8']) == 2
  assert '--decode' in capsys.readouterr().err


def test_router_split_by_group_scores_padded_visits_at_decode():
  # router_expert split over 4 expert ranks (8 groups, 2 kept): at decode nothing may drop, so each rank
  # sends every owner room for all its visits -- R_EP·k_tier·k_group visits per token, in the analytic
  # bound like the experts' R_EP·K rows, and exactly what the compiled step computes.
  cfg = load_config(REPO / 'configs' / 'tiny_hier.yaml',
                    ['moe.groups_per_tier=4', 'moe.k_group=1', 'mesh.expert=4', 'mesh.data=2'])
  rep = decode_cost.bound_decode(cfg, batch=8, cache_len=16, num_devices=8)
  assert rep['violations'] == [], rep['violations']
  row = rep['by_component']['router_expert']
  m = cfg.moe
  per_token_visits = 4 * m.k_tier * m.k_group
  assert row['analytic'] == cfg.model.num_moe_layers * 2 * cfg.model.d_model * per_token_visits * m.experts_per_group
  assert row['compiled'] == pytest.approx(row['analytic'], rel=1e-6)


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="libtpu not installed (pip install 'litejax[tpu]')")


@needs_libtpu
def test_tpu_decode_target_matmul_is_the_bound_and_the_rest_is_named(capsys):
  """`bound --decode --target v5p:2x2x1` on tiny: the TPU compiler's cost_analysis is 1.13x the matmul bound,
  all of it non-matmul work (the sampler's sort and random bits, the KV-cache write as a select over the
  cache, the dispatch's index work): the step's dots, as the walker reads the TPU HLO (one-row dots as
  multiply + reduce, the attention's as lhs-dilated convolutions), are the bound component by component.
  The verdict judges them, and fails past --tol."""
  from litejax.analysis import core
  rc = cli.main(['bound', '--config', str(TINY_YAML), '--decode', '--target', 'v5p:2x2x1', '--json', '--tol', '-0.5'])
  out = capsys.readouterr()
  rep = json.loads(out.out)
  m = rep['matmul']
  for name, row in m['by_component'].items():
    assert row['compiled'] == pytest.approx(row['analytic'], rel=1e-9), name
  assert m['flops_per_token_analytic'] == rep['flops_per_token_analytic']
  assert m['flops_per_token_non_matmul'] == pytest.approx(rep['flops_per_token_compiled'] - m['flops_per_token_compiled'])
  assert rep['ratio'] == pytest.approx(1 + m['flops_per_token_non_matmul'] / m['flops_per_token_analytic'])
  assert 1.05 < rep['ratio'] < 1.25, rep['ratio']       # 1.133 with jax 0.10.2's libtpu
  # -0.5: no program is within it; the verdict fails and says why
  assert rc == 1 and rep['violations'][0].startswith('matmul:') and 'BOUND EXCEEDED' in out.err
  assert core.violations(m, 0.03) == []
  # a component over its bound (twice the expert rows) fails at the default tolerance
  m['by_component']['experts']['compiled'] *= 2
  m['flops_per_token_compiled'] += m['by_component']['experts']['analytic']
  v = core.violations(m, 0.03)
  assert v and v[0].startswith('matmul:') and 'experts' in v[0]
