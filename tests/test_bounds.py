"""The analytic bound, checked by hand and on the spec's quadrillion example."""
import json
import subprocess
import sys


from litejax.model import bounds
from litejax.config import from_dict, load_config


def small():
  return from_dict({'model': dict(d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, seq_len=4, vocab_size=10,
                                   moe_every=2, d_ff=16, ffn_kind='mlp'),
                    'moe': dict(num_tiers=2, groups_per_tier=3, experts_per_group=4, k_tier=1, k_group=2,
                                k_expert=1, d_expert=5, expert_kind='mlp', capacity_factor=1.0)})


def test_hand_counted_params():
  p = bounds.param_counts(small())
  # per layer: attn q 8·2·4=64, k 8·1·4=32, v 32, o 2·4·8=64 -> 192; norms 16
  # layer 1 dense mlp 2·8·16 = 256; layer 2 MoE: router 8·2 + 2·8·3 + 6·8·4 = 16+48+192 = 256,
  # experts 24 · 2·8·5 = 1920; embeddings (tied) 80; final norm 8
  assert p.total == 2 * (192 + 16) + 256 + 256 + 1920 + 80 + 8
  assert p.expert_total == 1920
  # active: router 16 + 1·8·3 + 1·2·8·4 = 104; experts K=2 · 80 = 160
  assert p.expert_active_per_token == 160
  assert p.active_per_token == 2 * (192 + 16) + 256 + 104 + 160 + 80 + 8


def test_hand_counted_flops():
  cfg = small()
  f = bounds.forward_flops_per_token(cfg)
  assert f['attention_proj'] == 2 * (2 * 8 * 4 * (2 + 2) + 2 * 2 * 4 * 8)      # 2 layers
  assert f['attention_scores'] == 2 * 4 * 4 * 2 * 4                            # 4·S·H·hd per layer
  assert f['router_tier'] == 2 * 8 * 2 and f['router_group'] == 2 * 8 * 3 and f['router_expert'] == 2 * 8 * 2 * 4
  assert f['experts'] == 2 * (4 * 8 * 5)                                        # K=2 two-matmul experts
  assert f['dense_ffn'] == 4 * 8 * 16 and f['unembed'] == 2 * 8 * 10 and f['dispatch'] == 2 * 2 * 8
  # capacity padding: N=6 tokens, C = ceil(1.0·6·2/24) = 1 -> 24 slots for 12 assignments: 2x
  padded = bounds.forward_flops_per_token(cfg, tokens_per_group=6, dispatch='capacity')
  assert padded['experts'] == 24 / 6 * 4 * 8 * 5
  gather = bounds.forward_flops_per_token(cfg, tokens_per_group=6, dispatch='gather')
  assert gather['experts'] == f['experts']
  assert bounds.train_flops_per_token(cfg) == 3 * sum(f.values())


def test_flops_do_not_depend_on_expert_count_outside_router():
  base = small()
  for mult in (1, 16, 1024):
    cfg = from_dict({'moe': {'experts_per_group': 4 * mult}}, base=base)
    f = bounds.forward_flops_per_token(cfg)
    assert f['experts'] == bounds.forward_flops_per_token(base)['experts']
    assert f['router_expert'] == 2 * 8 * 2 * 4 * mult          # grows only with the kept groups' experts


def test_spec_claims_d_and_h_scaling():
  """Doubling d: attention projections x4, experts x2; doubling h: experts x2; FLOPs linear in L."""
  tiny = load_config('configs/tiny.yaml')

  def fl(**sections):
    return bounds.forward_flops_per_token(from_dict(sections, base=tiny))
  a, b = fl(model={'d_model': 128}), fl(model={'d_model': 256})
  assert b['attention_proj'] == 4 * a['attention_proj'] and b['experts'] == 2 * a['experts']
  assert fl(moe={'d_expert': 2 * tiny.moe.d_expert})['experts'] == 2 * a['experts']
  l2, l4 = fl(model={'num_layers': 2}), fl(model={'num_layers': 4})
  assert l4['experts'] == 2 * l2['experts'] and l4['attention_proj'] == 2 * l2['attention_proj']


def test_quadrillion_reproduces_the_spec():
  cfg = load_config('configs/quadrillion.yaml')
  s = bounds.summary(cfg)
  assert 0.99e15 < s['params_total'] < 1.02e15
  assert 120e6 < s['experts_total'] < 130e6                       # ~125M experts
  assert 7.9e6 < s['params_per_expert'] < 8.1e6                   # ~8M parameters each
  assert s['k_active'] == 4 and cfg.model.num_layers == 128
  assert 4.05e9 < s['params_expert_active_per_token'] < 4.15e9    # ~4.1B active expert params / token
  sf = s['spec_formula']
  assert sf['K'] == 4 and sf['b'] == 4 and sf['L'] == 128


def test_params_cli_json_on_quadrillion():
  # a quadrillion parameters counted from the real model's abstract shapes: nothing is allocated
  out = subprocess.run([sys.executable, '-m', 'litejax.cli', 'params', '--config', 'configs/quadrillion.yaml', '--json'],
                       capture_output=True, text=True, check=True)
  d = json.loads(out.stdout)
  for key in ('params_total', 'params_active_per_token', 'params_expert_active_per_token', 'experts_total',
              'experts_per_layer', 'k_active', 'flops_per_token_analytic'):
    assert isinstance(d[key], (int, float)), key
  assert d['params_total'] == d['params_total_from_model']
  assert d['experts_per_layer'] == 983040 and d['dispatch'] == 'gather'


def test_params_cli_reports_config_errors():
  out = subprocess.run([sys.executable, '-m', 'litejax.cli', 'params', '--config', 'configs/tiny.yaml',
                        '--set', 'moe.capacity_factor=0'], capture_output=True, text=True)
  assert out.returncode == 2 and 'moe.capacity_factor' in out.stderr
