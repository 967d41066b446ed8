"""The benchmark scripts' --quick modes run end to end and write their JSON (not timed: tests never
assert speed)."""
import json
import subprocess
import sys

import pytest

import tiers_quick
from conftest import REPO, import_experiment

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow


_env = tiers_quick.env


@pytest.fixture(scope='module')
def tiny_1k_ckpt(tmp_path_factory):
  return tiers_quick.checkpoint(tmp_path_factory)


def test_bench_moe_quick(tmp_path):
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'bench_moe.py'), '--quick', '--repeats', '1',
                  '--out', str(tmp_path)], check=True, env=_env(), capture_output=True, timeout=600)
  rows = json.loads((tmp_path / 'bench_moe.json').read_text())
  impls = {r['impl'] for r in rows}
  assert {'dense', 'litejax_auto', 'litejax_capacity', 'litejax_gather', 'litejax_einsum', 'ragged_dot',
          'nano_moe_jax', 'weight_grad_floor', 'litejax_auto_hier_router'} <= impls
  for r in rows:
    for key in ('impl', 'experts', 'median_seconds', 'ratio_to_dense', 'flops_compiled', 'temp_bytes'):
      assert key in r
  ok = [r for r in rows if r['impl'].startswith('litejax') or r['impl'] == 'dense']
  assert all(r['error'] is None and r['median_seconds'] > 0 and r['flops_compiled'] > 0 for r in ok)
  assert (tmp_path / 'bench_moe.png').stat().st_size > 0
  summary = json.loads((tmp_path / 'bench_moe_summary.json').read_text())
  assert set(summary['auto_ratio_to_dense']) == {'8', '64'} and summary['auto_max_ratio_to_dense'] > 0


def test_bench_train_quick(tmp_path):
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'bench_train.py'), '--quick', '--steps', '1',
                  '--out', str(tmp_path)], check=True, env=_env(), capture_output=True, timeout=600)
  rows = json.loads((tmp_path / 'bench_train.json').read_text())
  assert {(r['model'], r['devices']) for r in rows} == {('moe', 1), ('dense', 1), ('moe', 8), ('dense', 8)}
  assert all(r['tokens_per_second'] > 0 and r['compiles'] == 1 for r in rows)
  moe1 = next(r for r in rows if r['model'] == 'moe' and r['devices'] == 1)
  dense1 = next(r for r in rows if r['model'] == 'dense' and r['devices'] == 1)
  # equal active parameters within the router's share
  assert abs(moe1['params_active_per_token'] - dense1['params_active_per_token']) < 0.02 * dense1['params_active_per_token']


def test_bench_train_experts_quick(tmp_path):
  """--series experts --quick: one E (4·N·K), dense and sparse updates and the dense model, one process."""
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'bench_train.py'), '--series', 'experts', '--quick',
                  '--steps', '1', '--out', str(tmp_path)], check=True, env=_env(), capture_output=True, timeout=600)
  rows = json.loads((tmp_path / 'bench_train_experts.json').read_text())
  assert {(r['update'], r['experts']) for r in rows} == {(u, 2048) for u in ('dense', 'sparse', 'dense_model')}
  for r in rows:
    assert r['series'] == 'experts' and r['tokens_per_step'] == 128 and r['compiles'] == 1
    assert r['step_seconds'] > 0 and r['peak_bytes'] > 0 and r['optimizer_bytes_per_step'] > 0
  by = {r['update']: r for r in rows}
  assert by['sparse']['resolved_update'] == 'sparse' and by['dense']['resolved_update'] == 'dense'
  # the dense update reads and writes every expert's parameters and moments; the sparse one u = N·K rows
  assert by['dense']['optimizer_bytes_per_step'] > 2 * by['sparse']['optimizer_bytes_per_step']
  summary = json.loads((tmp_path / 'bench_train_experts_summary.json').read_text())
  assert summary['experts_at_or_above_nk'] == [2048] and set(summary['pass']) == set(summary['targets'])
  assert (tmp_path / 'bench_train_experts.png').stat().st_size > 0
  perf_table = import_experiment('perf_table')
  assert perf_table.experts_table(rows).count('\n') == 2   # header, rule, one row


def test_profile_moe_runs(tmp_path):
  out = subprocess.run([sys.executable, str(REPO / 'experiments' / 'profile_moe.py'), '--experts', '16',
                        '--tokens', '64', '--repeats', '1', '--json'],
                       check=True, env=_env(), capture_output=True, text=True, timeout=600).stdout
  times = json.loads(out[out.index('{'):])
  assert set(times) >= {'top_k_argmax', 'top_k_sort', 'lax_top_k', 'layer_fwd', 'experts_fwd_bwd_expert_matmul'}
  assert all(t > 0 for t in times.values())


@pytest.mark.slow
def test_bench_decode_quick(tmp_path):
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'bench_decode.py'), '--quick', '--out', str(tmp_path)],
                 check=True, env=_env(), capture_output=True, timeout=600)
  rows = json.loads((tmp_path / 'bench_decode.json').read_text())
  assert {(r['impl'], r['experts'], r['batch']) for r in rows} == {
      (i, e, 1) for i, e in (('dense', 0), ('moe', 16))}   # quick: batch 1 only
  for r in rows:
    for key in ('ms_per_token', 'tokens_per_second', 'bytes_accessed_per_token', 'predicted_ms_per_token'):
      assert r[key] > 0, key
    assert r['compiles'] == 1 and r['violations'] == []
    # the host measured with the row (interleaved): its per-call overhead prices the loop's host calls
    assert r['host']['call_overhead_s'] > 0
    assert r['predicted_host_ms'] == pytest.approx(4e3 * r['host']['call_overhead_s'])
  dense = next(r for r in rows if r['impl'] == 'dense' and r['batch'] == 1)
  moe = next(r for r in rows if r['impl'] == 'moe' and r['batch'] == 1)
  assert abs(moe['params_active_per_token'] - dense['params_active_per_token']) < 0.05 * dense['params_active_per_token']
  summary = json.loads((tmp_path / 'bench_decode_summary.json').read_text())
  assert set(summary['pass']) == {'moe_over_dense_max', 'max_over_min_over_experts', 'bytes_max_over_min'}
  assert (tmp_path / 'bench_decode.png').stat().st_size > 0


@pytest.mark.slow   # the shared shrunk tiny_1k (tiers_quick), then a few small compiles
def test_tierset_latency_quick(tmp_path, tiny_1k_ckpt):
  """experiments/tierset_latency.py --quick: predicted (step_cost + I/O) and measured ms per token for
  every TierSet of the shrunk tiny_1k."""
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'tierset_latency.py'), '--quick', '--out',
                  str(tmp_path), '--ckpt-dir', str(tiny_1k_ckpt)],
                 check=True, env=_env(), capture_output=True, timeout=900)
  r = json.loads((tmp_path / 'tierset_latency.json').read_text())
  assert [t['name'] for t in r['tiersets']] == ['hot', 'hot+warm', 'all']
  for t in r['tiersets']:
    assert t['predicted_ms_per_token'] == pytest.approx(t['compute_ms'] + t['io_ms'])
    assert t['measured_ms_per_token'] > 0 and t['predicted_over_measured'] > 0
  assert r['tiersets'][0]['io_ms'] == 0 and r['compute']['programs_ms'] > 0


@pytest.mark.slow   # the shared shrunk tiny_1k (tiers_quick), then ~20 small compiles
def test_bench_tiers_quick(tmp_path, tiny_1k_ckpt):
  """On the shared shrunk tiny_1k (trained 2 steps): replays its decode trace, decodes from the store (stall and
  fallback) and the shrunk store_1b tiered vs preloaded; checks the JSON's shape and exact invariants."""
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'bench_tiers.py'), '--quick', '--out', str(tmp_path),
                  '--ckpt-dir', str(tiny_1k_ckpt)], check=True, env=_env(), capture_output=True, timeout=900)
  r = json.loads((tmp_path / 'bench_tiers.json').read_text())
  assert {(s['policy'], s['device_fraction']) for s in r['sim']} == {
      (p, f) for p in ('lru', 'lfu', 'group') for f in (0.005, 0.01, 0.05, 0.1, 1.0)}
  full = [s for s in r['sim'] if s['device_fraction'] == 1.0]
  # every slot resident: only first touches miss, for every policy alike
  assert len({s['device_hit_rate'] for s in full}) == 1
  assert all(0 <= s['device_hit_rate'] <= s['hit_rate_device_or_host'] + 1e-12 <= 1 + 1e-12 for s in r['sim'])
  assert {(d['lookahead'], d['policy']) for d in r['decode']} == {(0, 'lru'), (1, 'lru')}
  assert all(d['tokens_per_second'] > 0 for d in r['decode'])
  assert r['fallback']['steps_compared'] >= 1 and 0 <= r['fallback']['token_agreement'] <= 1
  big = r['store_1b']
  assert big['tokens_identical'] and big['resident']['hit_rate']['device'] == 1.0
  assert big['resident']['bytes_read_per_token']['disk'] == 0
  for name in ('tiered', 'tiered_no_stage', 'tiered_no_lookahead', 'tiered_width_1'):   # paired per round
    assert big[name]['latency_ratio'] > 0 and len(big[name]['ms_per_token_rounds']) == big['rounds']
  assert big['tiered']['lookahead_width'] == 4 and big['tiered_no_lookahead']['lookahead_width'] is None
  assert set(r['targets']) == {'lookahead_recall_1_ahead', 'device_hit_rate_at_5pct_best_policy',
                               'store_1b_latency_ratio_1pct_lookahead'}
  # pre-gated rows (issue 22) beside today's: exact prefetch, recall 1 at depth 1, nothing wasted
  assert all('pregate' in row for row in r['sim'] + r['decode'])
  gated = [d for d in r['decode'] if d['pregate'] == 1]
  assert [(d['lookahead'], d['policy']) for d in gated] == [(0, 'lru')]
  for row in gated + [big['pregated']]:
    assert row['lookahead_recall'] == [1.0] and row['prefetch_wasted_bytes_per_token'] == 0
    assert sum(row['decode_hit_rate'].values()) == pytest.approx(1.0)
  assert big['pregated']['latency_ratio'] > 0 and len(big['pregated']['ms_per_token_rounds']) == big['rounds']
  assert big['profile']['pregated']['pregate_calls'] == 3 and big['profile']['pregated']['moe_pre_calls'] == 1
  assert [q['pregate'] for q in r['quality']] == [0, 1] and r['quality'][0]['val_loss'] > 0
  assert set(r['pregate_targets']) == {'store_1b_pregate1_latency_ratio_1pct', 'lookahead_recall_every_depth_pregated',
                                       'prefetch_wasted_bytes_per_token_pregated', 'val_loss_pregate1_over_pregate0',
                                       'decode_device_hit_rate_at_5pct_pregated_best_policy'}
  assert (tmp_path / 'bench_tiers.png').stat().st_size > 0
  trace = json.loads((tmp_path / 'bench_tiers_trace.json').read_text())
  assert len(trace['trace']) == 15 * len(trace['layers'])   # 16 tokens: 15 decode steps


def test_bench_import_quick(tmp_path):
  """bench_import --quick: a sharded synthetic Qwen3-MoE folder written tensor by tensor, imported into a store
  in a child process whose peak RSS is reported."""
  subprocess.run([sys.executable, str(REPO / 'experiments' / 'bench_import.py'), '--quick', '--out', str(tmp_path)],
                 check=True, env=_env(), capture_output=True, timeout=600)
  row = json.loads((tmp_path / 'bench_import.json').read_text())
  assert row['mode'] == 'quick' and row['files'] > 1 and row['experts'] == 2 * 16
  assert row['checkpoint_bytes'] > row['non_expert_bytes'] > row['largest_non_expert_tensor_bytes'] > 0
  assert row['peak_rss'] >= row['rss_before_import'] > 0 and row['gb_per_s'] > 0
  assert not (tmp_path / 'work').exists()
