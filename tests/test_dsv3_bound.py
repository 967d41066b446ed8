"""DeepSeek-V3's architecture (configs/deepseek_v3.yaml shrunk: MLA with YaRN, pooled group-limited sigmoid
routing, a shared expert) through the compiled-FLOP check: forward, train step and decode step, every
component at the analytic bound; and the analytic MLA and router formulas by hand."""
import pytest

from litejax.analysis import bound as cost, decode_bound
from litejax.config import load_config
from litejax.model import bounds

# Shapes small enough to compile in seconds; the structure stays the shipped config's (8 groups keep 4,
# k_expert pooled, scanned layers), and a dense first layer (moe_every 2) as DeepSeek-V3's prefix.
SMALL = ['model.d_model=32', 'model.num_layers=2', 'model.moe_every=2', 'model.seq_len=32', 'model.num_heads=2',
         'model.vocab_size=64', 'model.d_ff=48', 'moe.experts_per_group=3', 'moe.k_expert=5', 'moe.d_expert=16',
         'moe.d_shared=16', 'model.q_lora_rank=16', 'model.kv_lora_rank=12', 'model.qk_nope_head_dim=8',
         'model.qk_rope_head_dim=4', 'model.v_head_dim=6', 'mesh.expert=1', 'model.dtype=float32',
         'model.param_dtype=float32']


def small(*extra):
  return load_config('configs/deepseek_v3.yaml', SMALL + list(extra))


def test_analytic_mla_and_router_by_hand():
  cfg = small()
  mc, m = cfg.model, cfg.moe
  d, H, S, L = 32, 2, 32, 2
  f = bounds.forward_flops_per_token(cfg)
  q = 2 * d * 16 + 2 * 16 * H * (8 + 4)
  proj = q + 2 * d * (12 + 4) + 2 * 12 * H * (8 + 6) + 2 * H * 6 * d
  assert f['attention_proj'] == L * proj
  assert f['attention_scores'] == L * 2 * S * H * (8 + 4 + 6)
  assert f['router_group'] == 0                                 # top2_experts: no group router
  assert f['router_expert'] == 1 * 2 * d * 8 * 3                # every expert of every group: 2·d·E
  assert f['experts'] == 1 * 5 * 6 * d * 16                     # K = k_tier·k_expert = 5, pooled
  dec = bounds.decode_flops_per_token(cfg, 20)
  assert dec['attention_proj'] == L * proj                      # W_kv_b absorbed: the same count
  assert dec['attention_scores'] == L * 2 * 20 * H * (2 * 12 + 4)
  assert m.k_active == 5 and mc.attention == 'mla'
  pc = bounds.param_counts(cfg)
  attn = (d * 16 + 16 + 16 * H * 12) + (d * 16 + 12 + 12 * H * 14) + H * 6 * d
  assert bounds.attention_params(mc) == attn
  assert pc.router_total == d * 24 and pc.active_per_token - pc.expert_active_per_token == pc.dense + d * 24
  assert bounds.kv_cache_values_per_token(mc) == 12 + 4


@pytest.fixture(scope='module')
def reports():
  memo = {}

  def get(kind):
    if kind not in memo:
      if kind == 'decode':
        memo[kind] = decode_bound.bound_decode(small(), batch=2, cache_len=16, num_devices=1)
      else:
        memo[kind] = cost.bound(small(), num_devices=1, train=kind == 'train')
    return memo[kind]
  return get


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['forward', 'train', 'decode'])
def test_compiled_flops_are_the_bound_per_component(reports, kind):
  rep = reports(kind)
  assert rep['violations'] == [], rep['violations']
  for c in bounds.COMPONENTS:
    row = rep['by_component'][c]
    assert row['compiled'] == pytest.approx(row['analytic'], rel=1e-6, abs=1e-9), (c, row)
  assert rep['by_component']['router_expert']['analytic'] > 0 and rep['by_component']['router_group']['analytic'] == 0
