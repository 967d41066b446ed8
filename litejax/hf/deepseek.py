"""DeepSeek-V3 (`DeepseekV3ForCausalLM`) as a `litejax.hf.mapping.Family`: config.json <-> litejax config, and its
tensor names (docs/deepseek_v3.md has the mapping as a table).

Semantics checked against transformers 5.25's modeling_deepseek_v3.py (and tested against transformers' own
logits, tests/test_hf_parity.py):
  * router: sigmoid scores over all E experts in f32; selection adds `e_score_correction_bias`; a group is scored
    by the sum of its two best selection scores, the best `topk_group` of `n_group` groups are kept, and the
    `num_experts_per_tok` best experts pooled over the kept groups chosen. The gates are the unbiased scores,
    divided by their sum when `norm_topk_prob`, times `routed_scaling_factor`: litejax's `group_score:
    top2_experts`, `expert_selection: pooled`, `score: sigmoid`, `renormalize`, `routed_scale`, the bias in the
    RouterBias `bias_expert` (state, not a parameter: imported and exported in float32);
  * MLA attention (litejax.model.mla) with YaRN as transformers computes it (`factor` given, else
    max_position_embeddings / original_max_position_embeddings; `truncate` true);
  * rope: DeepSeek rotates interleaved pairs (2i, 2i+1) (`rope_interleave`, default true; false is refused),
    litejax rotate-half pairs (i, i + rope/2): the same rotation on the rope rows of q_b_proj / q_proj and
    kv_a_proj_with_mqa taken in the order (0, 2, 4, ..., 1, 3, 5, ...) (`RopeRows`);
  * layers 0..first_k_dense_replace-1 dense SwiGLU of `intermediate_size` (model.dense_layers), the rest MoE
    with `n_shared_experts` shared experts of `moe_intermediate_size` each (one FFN of their summed width);
  * the multi-token-prediction layers (`num_nextn_predict_layers`, tensors model.layers.{num_hidden_layers}.*
    onwards) are not modelled: transformers does not run them either; an import skips their tensors and says so.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from litejax.config import Config, from_dict
from litejax.hf.config_fields import INFORMATIONAL, ConfigFields
from litejax.hf.mapping import Family, Tensor, glu_experts

# Fields of DeepSeek's own config.json (its remote code) that do not change the forward pass: the training-only
# auxiliary loss, expert-parallel degree, and tensor-parallel pretraining split.
_INFORMATIONAL = ('auto_map', 'aux_loss_alpha', 'seq_aux', 'ep_size', 'pretraining_tp', 'num_key_value_heads',
                  'head_dim', 'qk_head_dim')
_YARN_FIELDS = ('rope_type', 'type', 'rope_theta', 'factor', 'original_max_position_embeddings', 'beta_fast',
                'beta_slow', 'mscale', 'mscale_all_dim', 'truncate')


def rope_permutation(rope: int) -> np.ndarray:
  """Interleaved pairs (2i, 2i+1) -> rotate-half pairs (i, i + rope/2): the rope columns in the order
  (0, 2, 4, ..., 1, 3, 5, ...)."""
  return np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])


@dataclasses.dataclass(frozen=True)
class RopeRows(Tensor):
  """An nn.Linear weight [out, in] whose output rows are `lead` plain rows, then `heads` blocks of `nope` plain
  and `rope` rope rows; litejax holds each block's rope rows permuted (`rope_permutation`)."""
  lead: int = 0
  heads: int = 1
  nope: int = 0
  rope: int = 0

  def rows(self) -> np.ndarray:
    per = np.concatenate([np.arange(self.nope), self.nope + rope_permutation(self.rope)])
    width = self.nope + self.rope
    return np.concatenate([np.arange(self.lead)] + [self.lead + h * width + per for h in range(self.heads)])

  def to_litejax(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return super().to_litejax(x[self.rows()], shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    y = super().to_hf(x)
    out = np.empty_like(y)
    out[self.rows()] = y
    return out


@dataclasses.dataclass(frozen=True)
class GroupedRouter(Tensor):
  """The router weight: HF [E, d] (experts in group order), litejax router_expert [G, d, E/G]."""

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    g, d, eg = shape
    return (g * eg, d)

  def to_litejax(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    g, d, eg = shape
    return np.ascontiguousarray(x.reshape(g, eg, d).transpose(0, 2, 1))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    g, d, eg = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1).reshape(g * eg, d))


# ---------------------------------------------------------------------------- config.json -> litejax

def _rope(f: ConfigFields, max_pos: int) -> dict:
  """litejax's rope fields from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (published)."""
  key = 'rope_parameters' if f.raw.get('rope_parameters') else 'rope_scaling'
  f.take('rope_parameters', None)
  spec = f.take('rope_scaling', None) if key == 'rope_scaling' else f.raw['rope_parameters']
  spec = spec or {}
  if not isinstance(spec, dict):
    raise f.error(key, f'must be an object, got {spec!r}')
  theta = f.take('rope_theta', spec.get('rope_theta', 10000.0))
  if 'rope_theta' in spec and theta != spec['rope_theta']:
    raise f.error('rope_theta', f'{theta} differs from {key}.rope_theta {spec["rope_theta"]}')
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
    raise f.error('rope_theta', f'must be a number > 0, got {theta!r}')
  kind = spec.get('rope_type', spec.get('type', 'default'))
  if kind == 'default':
    if extra := sorted(set(spec) - {'rope_type', 'type', 'rope_theta'}):
      raise f.error(f'{key}.{extra[0]}', 'not supported with plain RoPE')
    return dict(rope_theta=float(theta))
  if kind != 'yarn':
    raise f.error(f'{key}.rope_type', f'{kind!r} is not supported: litejax implements plain RoPE and YaRN')
  if extra := sorted(set(spec) - set(_YARN_FIELDS)):
    raise f.error(f'{key}.{extra[0]}', 'not supported with YaRN (litejax derives the attention factor from '
                  'factor, mscale and mscale_all_dim)')
  if spec.get('truncate', True) is not True:
    raise f.error(f'{key}.truncate', 'only true: litejax rounds the correction range (floor/ceil)')
  orig = spec.get('original_max_position_embeddings') or max_pos
  factor = spec.get('factor')
  if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
    raise f.error(f'{key}.factor', f'must be a number >= 1 (transformers\' MLA reads it), got {factor!r}')
  numbers = {k: spec.get(k) or d for k, d in (('beta_fast', 32.0), ('beta_slow', 1.0), ('mscale', 0.0),
                                               ('mscale_all_dim', 0.0))}
  for k, v in numbers.items():
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
      raise f.error(f'{key}.{k}', f'must be a number >= 0, got {v!r}')
  return dict(rope_theta=float(theta), rope_scaling='yarn', rope_factor=float(factor), rope_original_max_len=int(orig),
              rope_beta_fast=float(numbers['beta_fast']), rope_beta_slow=float(numbers['beta_slow']),
              rope_mscale=float(numbers['mscale']), rope_mscale_all_dim=float(numbers['mscale_all_dim']))


def deepseek_v3_config(f: ConfigFields, dtype: str, seq_len: int | None = None) -> Config:
  if f.raw.get('quantization_config') is not None:
    q = f.raw['quantization_config']
    method = q.get('quant_method') if isinstance(q, dict) else q
    raise f.error('quantization_config', f'{method!r} quantised weights (the published checkpoint\'s FP8 blocks '
                  'with weight_scale_inv) are not converted: dequantise to bfloat16 first')
  f.expect('hidden_act', ('silu',), 'litejax experts are SwiGLU (silu)', default='silu')
  f.expect('attention_dropout', (0, 0.0), 'litejax has no dropout', default=0.0)
  f.expect('attention_bias', (False,), 'litejax attention has no biases', default=False)
  f.expect('scoring_func', ('sigmoid',), 'DeepSeek-V3 routing scores with a sigmoid', default='sigmoid')
  f.expect('topk_method', ('noaux_tc',), 'litejax routes as DeepSeek-V3 does (noaux_tc: group-limited, the '
           'selection bias e_score_correction_bias)', default='noaux_tc')
  f.expect('moe_layer_freq', (1,), 'every layer after the first_k_dense_replace dense ones is MoE', default=1)
  f.expect('rope_interleave', (True,), 'litejax converts checkpoints that rotate interleaved pairs (DeepSeek\'s '
           'and transformers\' default)', default=True)
  mtp_layers(f.raw)   # checked here, skipped by the import (not_modelled)
  f.ignore('num_nextn_predict_layers', 'num_mtp_layers')
  d, heads, layers = f.int('hidden_size'), f.int('num_attention_heads'), f.int('num_hidden_layers')
  max_pos = f.int('max_position_embeddings', 4096)
  q_rank = f.int('q_lora_rank', None) or 0
  nope, rope = f.int('qk_nope_head_dim'), f.int('qk_rope_head_dim')
  if rope % 2:
    raise f.error('qk_rope_head_dim', f'must be even, got {rope}')
  dense = f.int('first_k_dense_replace', 0, minimum=0)
  if dense > layers:
    raise f.error('first_k_dense_replace', f'{dense} exceeds num_hidden_layers {layers}')
  model = dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads, attention='mla',
               q_lora_rank=q_rank, kv_lora_rank=f.int('kv_lora_rank'), qk_nope_head_dim=nope,
               qk_rope_head_dim=rope, v_head_dim=f.int('v_head_dim'), vocab_size=f.int('vocab_size'),
               tie_embeddings=f.flag('tie_word_embeddings', False), norm_eps=f.number('rms_norm_eps', 1e-6),
               ffn_kind='glu', d_ff=f.int('intermediate_size'), moe_every=1,
               dense_layers=f'0-{dense - 1}' if dense > 1 else ('0' if dense == 1 else ''),
               seq_len=seq_len or min(max_pos, 4096), dtype=dtype, param_dtype=dtype, **_rope(f, max_pos))
  e, g = f.int('n_routed_experts'), f.int('n_group', 1)
  k_group, k = f.int('topk_group', 1), f.int('num_experts_per_tok')
  if e % g:
    raise f.error('n_group', f'{g} groups do not divide the {e} experts')
  if k_group > g:
    raise f.error('topk_group', f'{k_group} exceeds n_group {g}')
  if k > k_group * (e // g):
    raise f.error('num_experts_per_tok', f'{k} exceeds the {k_group * (e // g)} experts of the kept groups')
  if g > 1 and e // g < 2:
    raise f.error('n_group', f'{g} groups of one expert: a group is scored by its two best experts')
  h = f.int('moe_intermediate_size')
  shared = f.int('n_shared_experts', 0, minimum=0)
  if not shared:
    raise f.error('n_shared_experts', '0: transformers\' DeepseekV3MoE always has shared experts')
  moe = dict(num_tiers=1, groups_per_tier=g, experts_per_group=e // g, k_tier=1, k_group=k_group, k_expert=k,
             expert_selection='pooled', group_score='top2_experts' if g > 1 else 'router', score='sigmoid',
             renormalize=f.flag('norm_topk_prob', True), routed_scale=f.number('routed_scaling_factor', 1.0),
             d_expert=h, expert_kind='glu', num_shared_experts=shared, d_shared=h)
  f.ignore(*INFORMATIONAL, *_INFORMATIONAL, 'architectures', 'model_type', 'n_routed_experts', 'num_local_experts')
  f.finish()
  return from_dict({'model': model, 'moe': moe})


def mtp_layers(raw: dict) -> int:
  """How many multi-token-prediction layers config.json declares (`num_nextn_predict_layers`, transformers 5's
  `num_mtp_layers`); HFError when the two disagree or are not counts."""
  counts = {k: raw[k] for k in ('num_nextn_predict_layers', 'num_mtp_layers') if raw.get(k) is not None}
  for k, v in counts.items():
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ConfigFields(raw).error(k, f'must be an integer >= 0, got {v!r}')
  if len(set(counts.values())) > 1:
    raise ConfigFields(raw).error('num_mtp_layers', f'{counts} disagree')
  return next(iter(counts.values()), 0)


def not_modelled(raw: dict) -> tuple[tuple[str, ...], str]:
  """The multi-token-prediction layers' tensor prefixes (model.layers.{num_hidden_layers + j}.), and why."""
  n, layers = mtp_layers(raw), raw.get('num_hidden_layers')
  if not n or not isinstance(layers, int):
    return (), ''
  return (tuple(f'model.layers.{layers + j}.' for j in range(n)),
          f'num_nextn_predict_layers: {n} multi-token-prediction layer(s) are not modelled by litejax (transformers '
          'does not run them either); their tensors are not imported')


# ---------------------------------------------------------------------------- tensors

def deepseek_v3_tensors(cfg: Config) -> list[Tensor]:
  """Every non-expert tensor: embeddings, norms, MLA, dense FFNs, routers (+ their selection bias), shared experts."""
  mc = cfg.model
  h, nope, rope, r_kv = mc.num_heads, mc.qk_nope_head_dim, mc.qk_rope_head_dim, mc.kv_lora_rank
  out = [Tensor('params/embed', 'model.embed_tokens.weight'), Tensor('params/final_norm/scale', 'model.norm.weight')]
  if not mc.tie_embeddings:
    out.append(Tensor('params/unembed', 'lm_head.weight', 1))
  for i in range(mc.num_layers):
    lj, hf = f'params/blocks/{i}/', f'model.layers.{i}.'
    at = hf + 'self_attn.'
    out += [Tensor(lj + 'attn_norm/scale', hf + 'input_layernorm.weight'),
            Tensor(lj + 'ffn_norm/scale', hf + 'post_attention_layernorm.weight'),
            RopeRows(lj + 'attn/w_kv_a', at + 'kv_a_proj_with_mqa.weight', 1, lead=r_kv, heads=1, rope=rope),
            Tensor(lj + 'attn/kv_norm/scale', at + 'kv_a_layernorm.weight'),
            Tensor(lj + 'attn/w_kv_b', at + 'kv_b_proj.weight', 1),
            Tensor(lj + 'attn/w_o', at + 'o_proj.weight', 2)]
    if mc.q_lora_rank:
      out += [Tensor(lj + 'attn/w_q_a', at + 'q_a_proj.weight', 1),
              Tensor(lj + 'attn/q_norm/scale', at + 'q_a_layernorm.weight'),
              RopeRows(lj + 'attn/w_q_b', at + 'q_b_proj.weight', 1, heads=h, nope=nope, rope=rope)]
    else:
      out.append(RopeRows(lj + 'attn/w_q', at + 'q_proj.weight', 1, heads=h, nope=nope, rope=rope))
    if mc.is_moe_layer(i):
      out += [GroupedRouter(lj + 'ffn/router_expert', hf + 'mlp.gate.weight'),
              Tensor(f'extra/blocks/{i}/ffn/bias_expert', hf + 'mlp.gate.e_score_correction_bias')]
      ffn, mlp = lj + 'ffn/shared/', hf + 'mlp.shared_experts.'
    else:
      ffn, mlp = lj + 'ffn/', hf + 'mlp.'
    out += [Tensor(ffn + 'w_gate', mlp + 'gate_proj.weight', 1), Tensor(ffn + 'w_in', mlp + 'up_proj.weight', 1),
            Tensor(ffn + 'w_out', mlp + 'down_proj.weight', 1)]
  return out


def deepseek_v3_zeros(cfg: Config) -> list[str]:
  """The tier and group selection biases of each MoE layer: one tier is always kept, and top2_experts scores
  groups from the expert biases, so neither is read (litejax.model.moe.routing)."""
  return [f'extra/blocks/{i}/ffn/{b}' for i in range(cfg.model.num_layers) if cfg.model.is_moe_layer(i)
          for b in ('bias_tier', 'bias_group')]


# ---------------------------------------------------------------------------- litejax -> config.json

def dense_prefix(cfg: Config) -> int | None:
  """k when exactly layers 0..k-1 are dense and the rest MoE (first_k_dense_replace), else None."""
  moe = [cfg.model.is_moe_layer(i) for i in range(cfg.model.num_layers)]
  k = moe.index(True) if True in moe else len(moe)
  return k if all(moe[k:]) else None


def deepseek_v3_problems(cfg: Config) -> list[str]:
  mc, m = cfg.model, cfg.moe
  out = []
  if mc.attention != 'mla':
    out.append(f'model.attention: {mc.attention}; DeepSeek-V3 attention is mla')
  if mc.rope_scaling not in ('none', 'yarn'):
    out.append(f'model.rope_scaling: {mc.rope_scaling}; DeepSeek-V3 has plain RoPE or YaRN')
  if mc.num_moe_layers == 0:
    out.append('model.moe_every: the model has no MoE layer')
  if dense_prefix(cfg) is None:
    out.append(f'model.moe_every/dense_layers: {mc.moe_every}/{mc.dense_layers!r}; DeepSeek-V3\'s dense layers are '
               'a prefix (first_k_dense_replace), every later layer MoE')
  if mc.qk_norm:
    out.append('model.qk_norm: DeepSeek-V3 has no per-head q/k norms')
  if mc.ffn_kind != 'glu' and mc.num_moe_layers < mc.num_layers:
    out.append(f'model.ffn_kind: {mc.ffn_kind}; dense layers are SwiGLU (glu)')
  if m.num_tiers != 1 or m.k_tier != 1:
    out.append(f'moe.num_tiers: {m.num_tiers} tiers; DeepSeek-V3 has one level of groups')
  if m.expert_selection != 'pooled' and m.k_group > 1:
    out.append(f'moe.expert_selection: {m.expert_selection}; DeepSeek-V3 pools its experts over the kept groups')
  if m.groups_per_tier > 1 and m.group_score != 'top2_experts':
    out.append(f'moe.group_score: {m.group_score}; DeepSeek-V3 scores a group by its two best experts')
  if m.score != 'sigmoid':
    out.append(f'moe.score: {m.score}; DeepSeek-V3 scores experts with a sigmoid')
  if m.expert_kind != 'glu':
    out.append(f'moe.expert_kind: {m.expert_kind}; the experts are SwiGLU (glu)')
  if not m.num_shared_experts:
    out.append('moe.num_shared_experts: 0; DeepSeek-V3 has shared experts')
  elif m.resolved_d_shared != m.d_expert:
    out.append(f'moe.d_shared: {m.resolved_d_shared}; DeepSeek-V3\'s shared experts are d_expert ({m.d_expert}) wide')
  return out


def deepseek_v3_hf_config(cfg: Config) -> dict:
  mc, m = cfg.model, cfg.moe
  rope = {'rope_type': 'default', 'rope_theta': mc.rope_theta}
  if mc.rope_scaling == 'yarn':
    rope = {'rope_type': 'yarn', 'rope_theta': mc.rope_theta, 'factor': mc.rope_factor,
            'original_max_position_embeddings': mc.rope_original_max_len, 'beta_fast': mc.rope_beta_fast,
            'beta_slow': mc.rope_beta_slow, 'mscale': mc.rope_mscale, 'mscale_all_dim': mc.rope_mscale_all_dim}
  return {'hidden_size': mc.d_model, 'num_hidden_layers': mc.num_layers, 'num_attention_heads': mc.num_heads,
          'num_key_value_heads': mc.num_heads, 'vocab_size': mc.vocab_size, 'tie_word_embeddings': mc.tie_embeddings,
          'rms_norm_eps': mc.norm_eps, 'rope_theta': mc.rope_theta, 'rope_parameters': rope, 'rope_interleave': True,
          'q_lora_rank': mc.q_lora_rank or None, 'kv_lora_rank': mc.kv_lora_rank,
          'qk_nope_head_dim': mc.qk_nope_head_dim, 'qk_rope_head_dim': mc.qk_rope_head_dim,
          'v_head_dim': mc.v_head_dim, 'head_dim': mc.qk_rope_head_dim,   # transformers' own derived fields
          'qk_head_dim': mc.qk_nope_head_dim + mc.qk_rope_head_dim, 'intermediate_size': mc.resolved_d_ff, 'moe_intermediate_size': m.d_expert,
          'first_k_dense_replace': dense_prefix(cfg), 'n_routed_experts': m.experts_total,
          'n_group': m.groups_per_tier, 'topk_group': m.k_group, 'num_experts_per_tok': m.k_expert,
          'n_shared_experts': m.num_shared_experts, 'norm_topk_prob': m.renormalize,
          'routed_scaling_factor': m.routed_scale, 'scoring_func': 'sigmoid', 'topk_method': 'noaux_tc',
          'num_nextn_predict_layers': 0, 'hidden_act': 'silu', 'attention_bias': False, 'attention_dropout': 0.0,
          'dtype': mc.param_dtype}


DEEPSEEK_V3 = Family(
    name='deepseek_v3', architecture='DeepseekV3ForCausalLM', model_type='deepseek_v3', to_config=deepseek_v3_config,
    export_problems=deepseek_v3_problems, to_hf_config=deepseek_v3_hf_config, tensors=deepseek_v3_tensors,
    experts=lambda cfg: glu_experts(cfg, {'w_gate': 'gate_proj', 'w_in': 'up_proj', 'w_out': 'down_proj'}),
    zeros=deepseek_v3_zeros, not_modelled=not_modelled)
