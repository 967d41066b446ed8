"""Compiled FLOPs (litejax.cost) against the analytic bound, and the backend artefacts it must catch."""
import math

import jax
import jax.numpy as jnp
import pytest

from litejax import bounds, cost
from litejax.config import load_config

SMALL = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=2', 'model.num_kv_heads=2',
         'model.seq_len=32', 'model.vocab_size=64', 'moe.d_expert=32']
CASES = {
    'flat': ['moe.num_tiers=1', 'moe.groups_per_tier=1', 'moe.experts_per_group=8'],
    'hierarchical': ['moe.num_tiers=2', 'moe.groups_per_tier=2', 'moe.experts_per_group=4'],
    'shared': ['moe.num_shared_experts=1', 'moe.expert_kind=mlp'],
    'glu_dense_layers': ['moe.expert_kind=glu', 'model.moe_every=2', 'model.num_layers=4'],
    'scanned': ['model.scan_layers=true', 'model.num_layers=4'],
    'gather': ['moe.dispatch=gather'],
}


def small(*extra):
  return load_config('configs/tiny.yaml', SMALL + list(extra))


@pytest.mark.parametrize('name', sorted(CASES))
def test_forward_within_bound(name):
  rep = cost.bound(small(*CASES[name]), num_devices=1)
  assert 0.97 <= rep['ratio'] <= 1.03, rep['by_component']
  assert not rep['violations']
  for c in bounds.COMPONENTS:   # each component is attributed, not only the total
    row = rep['by_component'][c]
    assert row['compiled'] == pytest.approx(row['analytic'], rel=0.03), (c, row)


@pytest.mark.parametrize('name', ['hierarchical', 'scanned'])
def test_train_step_within_bound(name):
  rep = cost.bound(small(*CASES[name]), num_devices=1, train=True)
  assert 0.97 <= rep['ratio'] <= 1.03, rep['by_component']


def test_expert_parallel_within_bound():
  rep = cost.bound(small('mesh.expert=8', 'mesh.data=1', 'moe.experts_per_group=8', 'moe.num_tiers=2',
                         'moe.groups_per_tier=2'), num_devices=8)
  assert rep['mesh']['expert'] == 8 and 'expert-parallel' in rep['dispatch']
  assert 0.97 <= rep['ratio'] <= 1.03, rep['by_component']
  assert rep['collective_bytes_per_rank_by_kind']['all_to_all'] > 0


def test_scan_counts_every_layer():
  unrolled = cost.bound(small('model.num_layers=4'), num_devices=1)
  scanned = cost.bound(small('model.num_layers=4', 'model.scan_layers=true'), num_devices=1)
  assert scanned['flops_per_token_compiled'] == pytest.approx(unrolled['flops_per_token_compiled'], rel=1e-6)
  # XLA's own figure counts the while body once: the walker's trip count is what fixes it.
  assert scanned['flops_per_token_xla_cost_analysis'] < 0.5 * unrolled['flops_per_token_xla_cost_analysis']


def test_ragged_dot_dense_lowering_is_an_artefact():
  g, m, k, n = 16, 256, 64, 32
  c = jax.jit(jax.lax.ragged_dot).lower(jax.ShapeDtypeStruct((m, k), jnp.float32),
                                        jax.ShapeDtypeStruct((g, k, n), jnp.float32),
                                        jax.ShapeDtypeStruct((g,), jnp.int32)).compile()
  w = cost.walk(c.as_text(), ())
  useful = 2 * m * k * n
  assert w.dot_flops == pytest.approx(g * useful, rel=0.01)       # dense: g × the useful work
  assert w.artefacts['masked_dense_dot'] == pytest.approx((g - 1) * useful, rel=0.01)


@pytest.mark.parametrize('rows', [1024, 16384])
def test_bf16_gather_convert_is_an_artefact(rows):
  def f(table, idx):
    return table.astype(jnp.float32)[idx].sum()
  c = jax.jit(f).lower(jax.ShapeDtypeStruct((rows, 64), jnp.bfloat16),
                       jax.ShapeDtypeStruct((128,), jnp.int32)).compile()
  w = cost.walk(c.as_text(), ())
  assert w.artefacts.get('gather_table_convert', 0) >= rows * 64     # charged over the whole table
  assert w.useful_flops < 4 * 128 * 64                              # useful work follows the indices


def test_gshard_einsum_dispatch_is_caught():
  cfg = small('moe.dispatch=einsum', 'model.seq_len=512', 'moe.num_tiers=1', 'moe.groups_per_tier=1',
              'moe.experts_per_group=8')
  prog = cost.compile_program(cfg, num_devices=1, global_batch=8)    # N = 4096 tokens
  rep = cost.report(prog)
  by = rep['by_component']
  assert by['dispatch']['compiled'] > 3 * by['experts']['compiled']  # one-hot einsums dwarf the experts
  assert by['dispatch']['compiled'] == pytest.approx(by['dispatch']['analytic'], rel=0.03)
  # Against the bound of the capacity path the dispatch component is named as the excess.
  by['dispatch']['analytic'] = cost.analytic_per_token(
      cfg.replace(moe=cfg.moe.__class__(**{**cfg.moe.__dict__, 'dispatch': 'capacity'})),
      prog.tokens_per_group)['dispatch']
  rep['flops_per_token_analytic'] = sum(r['analytic'] for r in by.values() if r is not by['elementwise'])
  v = cost.violations(rep, 0.03)
  assert v and 'dispatch' in v[0]


def test_flat_outside_router_across_experts():
  outside = {}
  for e in (8, 64, 512, 4096, 2 ** 16):
    rep = cost.bound(small('moe.num_tiers=1', 'moe.groups_per_tier=1', f'moe.experts_per_group={e}',
                           'moe.dispatch=gather', 'moe.d_expert=16'), num_devices=1)
    by = rep['by_component']
    outside[e] = sum(r['compiled'] for c, r in by.items()
                     if not c.startswith('router') and c in bounds.COMPONENTS)
    assert rep['ratio'] <= 1.03
  lo, hi = min(outside.values()), max(outside.values())
  assert hi / lo - 1 < 0.01, outside


def test_auto_stays_within_bound_as_experts_grow():
  for e in (8, 512, 2 ** 14):
    rep = cost.bound(small(f'moe.experts_per_group={e}', 'moe.num_tiers=1', 'moe.groups_per_tier=1',
                           'moe.d_expert=16'), num_devices=1)
    # Total only: with a wide flat router some metadata-less dots are attributed to the wrong
    # neighbouring component (a known limitation of litejax.cost's fallback attribution).
    assert rep['ratio'] <= 1.03, (e, rep['dispatch'])
    assert math.isfinite(rep['flops_per_token_compiled'])
