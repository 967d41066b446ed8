"""transformers' DeepSeek-V3 tensors -> litejax modules, for the module-level parity fixtures (tests/fixtures/dsv3,
written by experiments/dsv3_fixtures.py), through the library's own mapping (litejax.hf.deepseek, what
`litejax import-hf` uses): the attention and router fixtures hold one module's tensors, the model fixture a whole
DeepseekV3ForCausalLM's. The config sections of the module fixtures are spelled out here (they hold only their
module's fields); the whole model's config is the library's.
"""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np

from litejax.config import from_dict
from litejax.hf.config_fields import ConfigFields
from litejax.hf.deepseek import DEEPSEEK_V3, GroupedRouter


def config(fixture) -> dict:
  return json.loads(str(fixture['config']))


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
               rope_original_max_len=rp['original_max_position_embeddings'], rope_beta_fast=rp['beta_fast'],
               rope_beta_slow=rp['beta_slow'], rope_mscale=rp['mscale'], rope_mscale_all_dim=rp['mscale_all_dim'])
  return out


def moe_section(hc: dict) -> dict:
  """litejax `moe:` fields of an HF DeepSeek-V3 router config."""
  e, g = hc['n_routed_experts'], hc['n_group']
  return dict(num_tiers=1, groups_per_tier=g, experts_per_group=e // g, k_tier=1, k_group=hc['topk_group'],
              k_expert=hc['num_experts_per_tok'], expert_selection='pooled', group_score='top2_experts',
              score='sigmoid', renormalize=hc['norm_topk_prob'], routed_scale=hc['routed_scaling_factor'],
              d_expert=hc.get('moe_intermediate_size', 8), expert_kind='glu',
              num_shared_experts=hc.get('n_shared_experts', 0), d_shared=hc.get('moe_intermediate_size', 0),
              dispatch='dropless')


def model_config(hc: dict):
  """The litejax Config of the fixture's whole DeepseekV3ForCausalLM, as `import-hf` derives it, routed
  dropless (as transformers does: no expert has a capacity)."""
  cfg = DEEPSEEK_V3.to_config(ConfigFields(hc), 'float32', 8)
  return cfg.replace(moe=dataclasses.replace(cfg.moe, dispatch='dropless'))


def t(x) -> jnp.ndarray:
  return jnp.asarray(np.ascontiguousarray(x), jnp.float32)


def router_weight(weight_ed: np.ndarray, groups: int) -> jnp.ndarray:
  """router_expert [G, d, E/G] from the gate's [E, d] (litejax.hf.deepseek.GroupedRouter)."""
  e, d = weight_ed.shape
  return t(GroupedRouter('', '').to_litejax(weight_ed, (groups, d, e // groups)))


def _variable(module, path: list[str]):
  for part in path:
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


def mla_weights(w: dict, prefix: str, hc: dict, attn) -> dict[str, jnp.ndarray]:
  """MLAttention attribute -> value from the fixture's `{prefix}q_a_proj.weight`, ...: the library's mapping of
  layer 0's attention (`litejax.hf.deepseek.deepseek_v3_tensors`), renamed to the fixture's prefix."""
  cfg = from_dict({'model': {**model_section(hc), 'num_layers': 1, 'moe_every': 0}})
  out = {}
  for tensor in DEEPSEEK_V3.tensors(cfg):
    if '/blocks/0/attn/' not in tensor.leaf:
      continue
    attr = tensor.leaf.split('/attn/')[1].replace('/', '.')
    shape = _variable(attn, attr.split('.'))[...].shape
    out[attr] = t(tensor.to_litejax(w[tensor.hf.replace('model.layers.0.self_attn.', prefix)], shape))
  return out


def assign(module, values: dict[str, jnp.ndarray]) -> None:
  """Sets module.<dotted name>[...] = value for each entry, checking shapes."""
  for name, value in values.items():
    var = _variable(module, name.split('.'))
    assert var[...].shape == value.shape, (name, var[...].shape, value.shape)
    var[...] = value


def load_model(model, w: dict, cfg) -> None:
  """Fills a litejax Transformer (unscanned) with a DeepseekV3ForCausalLM's tensors (transformers 5's fused
  experts) through the library's mapping: every parameter and selection bias the family names, checked."""
  filled = set()
  for tensor in DEEPSEEK_V3.tensors(cfg):
    var = _variable(model, tensor.leaf.split('/')[1:])
    var[...] = t(tensor.to_litejax(w[tensor.hf], var[...].shape))
    filled.add(tensor.leaf)
  for a in DEEPSEEK_V3.experts(cfg):
    var = _variable(model, a.leaf.split('/')[1:])
    fused = w[a.fused]
    var[...] = t(np.stack([a.from_matrix(fused[e], True) for e in range(fused.shape[0])]))
    filled.add(a.leaf)
  assert len(filled) == len(DEEPSEEK_V3.tensors(cfg)) + len(DEEPSEEK_V3.experts(cfg))
