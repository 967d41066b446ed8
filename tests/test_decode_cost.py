"""`litejax bound --decode` (litejax.decode_cost): the decode step compiled from abstract shapes,
compiled FLOPs against bounds.decode_flops_per_token, expert weights read = the active rows' slices."""
import json

import pytest

from litejax import bounds, cli, decode_cost
from litejax.config import load_config
from train_helpers import TINY_YAML


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
  assert lat['dominant'] in ('compute', 'communication', 'memory') and lat['predicted_ms_per_token'] > 0


def test_scanned_layers_reading_every_expert_is_a_violation():
  # The check can fail: a layer scan slices each layer's whole [E, d, h] table before the gather.
  cfg = load_config(TINY_YAML, ['model.scan_layers=true'])
  rep = decode_cost.bound_decode(cfg, batch=2, cache_len=16, num_devices=1)
  assert rep['ratio'] == pytest.approx(1.0)
  assert rep['expert_weight_bytes_per_token'] > rep['expert_weight_bytes_per_token_analytic']
  assert any('expert weights read' in v for v in rep['violations'])


def test_cache_len_needs_decode(capsys):
  assert cli.main(['bound', '--config', str(TINY_YAML), '--cache-len', '8']) == 2
  assert '--decode' in capsys.readouterr().err
