"""experiments/bound_sweep.py --axis experts --quick: the headline properties, from its JSON."""
import json

import pytest

from conftest import import_experiment

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  mod = import_experiment('bound_sweep')
  out = tmp_path_factory.mktemp('sweep')
  rc = mod.main(['--axis', 'experts', '--quick', '--out', str(out)])
  rows = json.loads((out / 'bound_sweep.json').read_text())
  summary = json.loads((out / 'bound_sweep_summary.json').read_text())
  return rc, rows, summary, out


def series(rows, name):
  return sorted((r for r in rows if r['series'] == name), key=lambda r: r['value'])


def test_outputs(sweep):
  rc, rows, summary, out = sweep
  assert rc == 0 and summary['ok'], summary['checks']
  assert (out / 'bound_sweep_experts.png').stat().st_size > 10_000
  for r in rows:
    for k in ('axis', 'value', 'series', 'experts_total', 'flops_per_token_analytic', 'flops_per_token_compiled',
              'by_component', 'dispatch'):
      assert k in r, k


def test_fixed_path_flat_outside_router(sweep):
  _, rows, _, _ = sweep
  g = series(rows, 'gather')
  assert g[0]['value'] == 8 and g[-1]['value'] >= 2 ** 20 and len({r['k_active'] for r in g}) == 1
  outside = [r['outside_router_compiled'] for r in g]
  assert max(outside) / min(outside) - 1 < 0.01, outside
  for r in g:   # the router grows only as its analytic term 2·d·(T + k_tier·G + k_tier·k_group·E_g)
    assert r['router_compiled'] == pytest.approx(r['router_analytic'], rel=0.01)
    assert r['router_analytic'] == 2 * r['d_model'] * (r['tiers'] * (r['tiers'] > 1) +
                                                       r['groups_per_tier'] * (r['groups_per_tier'] > 1) +
                                                       r['experts_per_group'])


def test_auto_within_bound(sweep):
  _, rows, _, _ = sweep
  a = series(rows, 'auto')
  assert {r['dispatch_resolved'] for r in a} == {'capacity', 'gather'}
  for r in a:
    assert r['flops_per_token_compiled'] <= 1.03 * r['flops_per_token_analytic'] and not r['violations']


def test_flat_router_and_einsum_grow(sweep):
  _, rows, _, _ = sweep
  f, e = series(rows, 'flat_router'), series(rows, 'einsum')
  assert f[-1]['value'] >= 2 ** 12
  assert f[-1]['router_compiled'] / f[0]['router_compiled'] == pytest.approx(f[-1]['value'] / f[0]['value'], rel=0.01)
  assert e[-1]['flops_per_token_compiled'] / e[0]['flops_per_token_compiled'] > 2
  g = {r['value']: r for r in series(rows, 'gather')}
  assert e[-1]['flops_per_token_compiled'] > 3 * g[e[-1]['value']]['flops_per_token_compiled']
