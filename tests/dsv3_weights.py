"""transformers' DeepSeek-V3 tensors -> litejax parameters, for the parity fixtures (tests/fixtures/dsv3,
written by experiments/dsv3_fixtures.py). The mapping the Hugging Face import needs, spelled out once
(docs/deepseek_v3.md has it as a table); not library code: litejax/hf owns imports.
"""
import json

import jax.numpy as jnp
import numpy as np

from litejax.config import from_dict


def config(fixture) -> dict:
  return json.loads(str(fixture['config']))


def rope_permutation(rope: int) -> np.ndarray:
  """DeepSeek rotates interleaved pairs (2i, 2i+1); litejax rotate-half pairs (i, i + rope/2): the same
  rotation on the rope columns reordered to (0, 2, 4, ..., 1, 3, 5, ...)."""
  return np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])


def model_section(hc: dict) -> dict:
  """litejax `model:` fields of an HF DeepSeek-V3 attention config (rope_parameters, transformers 5)."""
  rp = hc['rope_parameters']
  out = dict(d_model=hc['hidden_size'], num_heads=hc['num_attention_heads'],
             num_kv_heads=hc['num_attention_heads'], attention='mla', q_lora_rank=hc['q_lora_rank'] or 0,
             kv_lora_rank=hc['kv_lora_rank'], qk_nope_head_dim=hc['qk_nope_head_dim'],
             qk_rope_head_dim=hc['qk_rope_head_dim'], v_head_dim=hc['v_head_dim'], rope_theta=rp['rope_theta'],
             norm_eps=hc['rms_norm_eps'])
  if rp['rope_type'] == 'yarn':
    out.update(rope_scaling='yarn', rope_factor=rp['factor'],
               rope_original_max_len=rp['original_max_position_embeddings'], rope_beta_fast=rp['beta_fast'], rope_beta_slow=rp['beta_slow'], rope_mscale=rp['mscale'],
               rope_mscale_all_dim=rp['mscale_all_dim'])
  return out


def moe_section(hc: dict) -> dict:
  """litejax `moe:` fields of an HF DeepSeek-V3 router / MoE config."""
  e, g = hc['n_routed_experts'], hc['n_group']
  return dict(num_tiers=1, groups_per_tier=g, experts_per_group=e // g, k_tier=1, k_group=hc['topk_group'],
              k_expert=hc['num_experts_per_tok'], expert_selection='pooled', group_score='top2_experts',
              score='sigmoid', renormalize=hc['norm_topk_prob'], routed_scale=hc['routed_scaling_factor'],
              d_expert=hc.get('moe_intermediate_size', 8), expert_kind='glu',
              num_shared_experts=hc.get('n_shared_experts', 0), d_shared=hc.get('moe_intermediate_size', 0),
              dispatch='dropless')


def model_config(hc: dict):
  """The litejax Config of the fixtures' whole DeepseekV3ForCausalLM (2 layers, the first dense: moe_every 2)."""
  assert hc['num_hidden_layers'] == 2 and hc['first_k_dense_replace'] == 1
  model = dict(model_section(hc), num_layers=2, moe_every=2, vocab_size=hc['vocab_size'], seq_len=8,
               tie_embeddings=hc['tie_word_embeddings'], d_ff=hc['intermediate_size'], ffn_kind='glu')
  return from_dict({'model': model, 'moe': moe_section(hc)})


def t(x) -> jnp.ndarray:
  return jnp.asarray(np.ascontiguousarray(x), jnp.float32)


def mla_weights(w: dict, prefix: str, hc: dict) -> dict[str, jnp.ndarray]:
  """MLAttention attribute -> value from `{prefix}q_a_proj.weight`, ...: nn.Linear weights [out, in]
  transposed, per-head outputs split [.., H, per-head], the rope columns permuted (`rope_permutation`)."""
  h, nope, rope, v = hc['num_attention_heads'], hc['qk_nope_head_dim'], hc['qk_rope_head_dim'], hc['v_head_dim']
  r_kv = hc['kv_lora_rank']
  perm = rope_permutation(rope)

  def q_heads(weight):   # [H·(nope+rope), in] -> [in, H, nope+rope]
    q = weight.reshape(h, nope + rope, -1)
    q = np.concatenate([q[:, :nope], q[:, nope:][:, perm]], axis=1)
    return q.transpose(2, 0, 1)

  out = {}
  if hc['q_lora_rank']:
    out['w_q_a'] = t(w[prefix + 'q_a_proj.weight'].T)
    out['q_norm.scale'] = t(w[prefix + 'q_a_layernorm.weight'])
    out['w_q_b'] = t(q_heads(w[prefix + 'q_b_proj.weight']))
  else:
    out['w_q'] = t(q_heads(w[prefix + 'q_proj.weight']))
  kv_a = w[prefix + 'kv_a_proj_with_mqa.weight']                      # [r_kv + rope, d]
  out['w_kv_a'] = t(np.concatenate([kv_a[:r_kv], kv_a[r_kv:][perm]]).T)
  out['kv_norm.scale'] = t(w[prefix + 'kv_a_layernorm.weight'])
  out['w_kv_b'] = t(w[prefix + 'kv_b_proj.weight'].reshape(h, nope + v, r_kv).transpose(2, 0, 1))
  out['w_o'] = t(w[prefix + 'o_proj.weight'].reshape(-1, h, v).transpose(1, 2, 0))
  return out


def glu_weights(w: dict, prefix: str) -> dict[str, jnp.ndarray]:
  """A DeepseekV3MLP (gate/up/down_proj) -> litejax FFN glu: w_gate, w_in (up), w_out (down), transposed."""
  return {'w_gate': t(w[prefix + 'gate_proj.weight'].T), 'w_in': t(w[prefix + 'up_proj.weight'].T),
          'w_out': t(w[prefix + 'down_proj.weight'].T)}


def moe_weights(w: dict, prefix: str, hc: dict) -> dict[str, jnp.ndarray]:
  """DeepseekV3MoE (transformers 5's fused experts) -> MoEBlock attributes."""
  g, e = hc['n_group'], hc['n_routed_experts']
  gate_up = w[prefix + 'experts.gate_up_proj']                        # [E, 2h, d]: gate rows, then up rows
  hidden = gate_up.shape[1] // 2
  out = {'router_expert': t(w[prefix + 'gate.weight'].reshape(g, e // g, -1).transpose(0, 2, 1)),
         'bias_expert': t(w[prefix + 'gate.e_score_correction_bias']),
         'w_gate': t(gate_up[:, :hidden].transpose(0, 2, 1)), 'w_in': t(gate_up[:, hidden:].transpose(0, 2, 1)),
         'w_out': t(w[prefix + 'experts.down_proj'].transpose(0, 2, 1))}
  out.update({'shared.' + k: v for k, v in glu_weights(w, prefix + 'shared_experts.').items()})
  return out


def assign(module, values: dict[str, jnp.ndarray]) -> None:
  """Sets module.<dotted name>[...] = value for each entry, checking shapes."""
  for name, value in values.items():
    *path, leaf = name.split('.')
    owner = module
    for p in path:
      owner = getattr(owner, p)
    var = getattr(owner, leaf)
    assert var[...].shape == value.shape, (name, var[...].shape, value.shape)
    var[...] = value


def load_model(model, w: dict, hc: dict) -> None:
  """Fills a litejax Transformer (unscanned, model_config) with the fixture's DeepseekV3ForCausalLM weights."""
  assign(model, {'embed': t(w['model.embed_tokens.weight']), 'unembed': t(w['lm_head.weight'].T),
                 'final_norm.scale': t(w['model.norm.weight'])})
  for i, block in enumerate(model.blocks):
    pre = f'model.layers.{i}.'
    assign(block, {'attn_norm.scale': t(w[pre + 'input_layernorm.weight']),
                   'ffn_norm.scale': t(w[pre + 'post_attention_layernorm.weight'])})
    assign(block.attn, mla_weights(w, pre + 'self_attn.', hc))
    ffn = moe_weights(w, pre + 'mlp.', hc) if block.is_moe else glu_weights(w, pre + 'mlp.')
    assign(block.ffn, ffn)
