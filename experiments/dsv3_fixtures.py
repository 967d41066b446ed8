"""Writes tests/fixtures/dsv3/: reference outputs of transformers' own DeepSeek-V3 modules on tiny random
configs, which tests/test_dsv3_parity.py compares litejax with (CI installs neither torch nor transformers:
the committed .npz files are the reference; this script regenerates them).

Needs: pip install torch transformers   (written against torch 2.13 CPU and transformers 5.25)
Run:   python experiments/dsv3_fixtures.py [--out tests/fixtures/dsv3]

Fixtures (float32, each .npz holds the module's weights under transformers' names, its inputs, outputs and
its config as JSON under 'config'):
  router_*.npz  DeepseekV3TopkRouter: hidden [N, d], weight [E, d], e_score_correction_bias [E] ->
                topk_indices / topk_weights [N, k] (transformers' order: unsorted)
  mla_*.npz     DeepseekV3Attention + its rotary embedding: x [B, S, d] -> out [B, S, d] (causal, whole
                sequence), and prefill of `prefill` tokens then one token at a time through a DynamicCache
                -> out_cached [B, S, d]; the rotary inv_freq and attention_scaling, the softmax scaling
  model.npz     DeepseekV3ForCausalLM, 2 layers (the first dense): ids [B, S] -> logits [B, S, V], logits of
                prefill + cached decode, and each MoE layer's topk_indices [B·S, k]
Odd shapes on purpose: expert counts that are not powers of two, topk_group < n_group, q_lora_rank set and
null, rope scaling YaRN (two mscale settings) and none; weights drawn at std 0.3 (transformers' init
std 0.02 would make every output nearly zero) and a random correction bias.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

REPO = pathlib.Path(__file__).resolve().parents[1]

YARN = {'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 40.0, 'original_max_position_embeddings': 8,
        'beta_fast': 32.0, 'beta_slow': 1.0, 'mscale': 1.0, 'mscale_all_dim': 1.0}
MLA = dict(hidden_size=32, num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=10, qk_nope_head_dim=6,
           qk_rope_head_dim=8, v_head_dim=5, max_position_embeddings=320, attention_bias=False)
ROUTERS = {   # (n_routed_experts, n_group, topk_group, num_experts_per_tok, routed_scaling_factor, norm_topk_prob)
    'router_12e_4g': (12, 4, 2, 4, 2.5, True),
    'router_15e_5g': (15, 5, 3, 5, 1.0, False),
    'router_18e_3g': (18, 3, 1, 3, 1.5, True),
}
MLAS = {
    'mla_yarn_lora': dict(q_lora_rank=12, rope_parameters=YARN),
    'mla_yarn_mscale_half': dict(q_lora_rank=None, rope_parameters={**YARN, 'mscale_all_dim': 0.5}),
    'mla_plain': dict(q_lora_rank=None, rope_parameters={'rope_type': 'default', 'rope_theta': 500.0}),
}
MODEL = dict(MLA, vocab_size=64, intermediate_size=48, moe_intermediate_size=8, num_hidden_layers=2,
             first_k_dense_replace=1, n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=4,
             n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=12,
             rope_parameters=YARN, rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0)


def randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
  """Every parameter and buffer drawn afresh: matrices N(0, 0.3²), norm weights 1 + N(0, 0.1²), the
  correction bias N(0, 0.1²) (large enough to move group and expert choices)."""
  with torch.no_grad():
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
      if 'inv_freq' in name:
        continue
      if name.endswith('layernorm.weight') or name.endswith('norm.weight'):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
      elif 'e_score_correction_bias' in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def weights(module: torch.nn.Module, prefix: str = '') -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def causal_mask(s: int, t: int, offset: int = 0) -> torch.Tensor:
  """Additive eager mask [1, 1, s, t]: query i (at position offset + i) sees keys 0..offset + i."""
  q = torch.arange(s)[:, None] + offset
  k = torch.arange(t)[None, :]
  return torch.where(k <= q, 0.0, torch.finfo(torch.float32).min)[None, None]


def router_fixture(spec, gen) -> dict[str, np.ndarray]:
  e, g, kg, k, scale, norm = spec
  cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=e, n_group=g, topk_group=kg, num_experts_per_tok=k,
                         routed_scaling_factor=scale, norm_topk_prob=norm)
  router = ds.DeepseekV3TopkRouter(cfg)
  randomise(router, gen)
  hidden = torch.randn(40, 16, generator=gen)
  with torch.no_grad():
    _, topk_weights, topk_indices = router(hidden)
  config = dict(n_routed_experts=e, n_group=g, topk_group=kg, num_experts_per_tok=k, routed_scaling_factor=scale,
                norm_topk_prob=norm, hidden_size=16)
  return {**weights(router), 'hidden': hidden.numpy(), 'topk_indices': topk_indices.numpy(),
          'topk_weights': topk_weights.numpy(), 'config': np.array(json.dumps(config))}


def mla_fixture(extra, gen, batch=2, seq=7, prefill=4) -> dict[str, np.ndarray]:
  cfg = DeepseekV3Config(**MLA, **extra)
  cfg._attn_implementation = 'eager'
  attn = ds.DeepseekV3Attention(cfg, layer_idx=0).eval()
  randomise(attn, gen)
  rotary = ds.DeepseekV3RotaryEmbedding(cfg)
  x = torch.randn(batch, seq, cfg.hidden_size, generator=gen)
  pos = torch.arange(seq)[None].expand(batch, -1)
  with torch.no_grad():
    out, _ = attn(x, rotary(x, pos), causal_mask(seq, seq))
    cache = DynamicCache(config=cfg)
    steps = [attn(x[:, :prefill], rotary(x, pos[:, :prefill]), causal_mask(prefill, prefill), cache=cache)[0]]
    for j in range(prefill, seq):
      steps.append(attn(x[:, j:j + 1], rotary(x, pos[:, j:j + 1]), causal_mask(1, j + 1, j), cache=cache)[0])
  config = {**MLA, **extra, 'rms_norm_eps': cfg.rms_norm_eps}
  return {**weights(attn), 'x': x.numpy(), 'out': out.numpy(), 'out_cached': torch.cat(steps, 1).numpy(),
          'prefill': np.array(prefill), 'inv_freq': rotary.inv_freq.numpy(),
          'attention_scaling': np.array(rotary.attention_scaling, np.float32),
          'scaling': np.array(attn.scaling, np.float32),
          'config': np.array(json.dumps(config))}


def model_fixture(gen, batch=2, seq=8, prefill=5) -> dict[str, np.ndarray]:
  cfg = DeepseekV3Config(**MODEL)
  cfg._attn_implementation = 'eager'
  model = DeepseekV3ForCausalLM(cfg).eval()
  randomise(model, gen)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
  picks = []
  hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: picks.append(o[2].numpy().copy()))
           for layer in model.model.layers[cfg.first_k_dense_replace:]]
  with torch.no_grad():
    logits = model(ids).logits
    for h in hooks:
      h.remove()
    cache = DynamicCache(config=cfg)
    steps = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
    for j in range(prefill, seq):
      steps.append(model(ids[:, j:j + 1], cache=cache, use_cache=True).logits)
  return {**weights(model), 'ids': ids.numpy(), 'logits': logits.numpy(), 'logits_cached': torch.cat(steps, 1).numpy(),
          'prefill': np.array(prefill), 'topk_indices': np.stack(picks), 'config': np.array(json.dumps(MODEL))}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', type=pathlib.Path, default=REPO / 'tests' / 'fixtures' / 'dsv3')
  args = ap.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  gen = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  fixtures = {name: router_fixture(spec, gen) for name, spec in ROUTERS.items()}
  fixtures.update({name: mla_fixture(extra, gen) for name, extra in MLAS.items()})
  fixtures['model'] = model_fixture(gen)
  for name, arrays in fixtures.items():
    path = args.out / f'{name}.npz'
    np.savez_compressed(path, **{k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in arrays.items()})
    print(f'{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size / 1e3:.1f} kB')


if __name__ == '__main__':
  main()
