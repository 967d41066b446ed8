"""The transformers architectures litejax converts, each a `litejax.hf.mapping.Family`: its config.json <->
litejax config, and its tensor names (DeepSeek-V3's in litejax.hf.deepseek).

Semantics checked against transformers 5.25's modeling_mixtral.py / modeling_qwen3_moe.py (and tested against
transformers' own logits, tests/test_hf.py):
  * router: softmax over all E experts in f32, top-k, then (Mixtral always; Qwen3 when norm_topk_prob) the k
    weights renormalised. litejax with T = G = 1 computes exactly that (litejax.model.moe.routing), with
    moe.renormalize = norm_topk_prob: without it the weights are the softmax's own, not a softmax over the k;
  * experts: down(silu(gate(x)) · up(x)), litejax's glu expert (w_gate, w_in, w_out);
  * RMSNorm in f32, x · rsqrt(mean(x²) + eps) times the weight; Qwen3's q_norm / k_norm the same over head_dim,
    before RoPE (model.qk_norm);
  * RoPE rotate-half with inv_freq = 1 / θ^(2i / hd), litejax's θ^(-i / (hd/2)); scores scaled by hd^-0.5;
  * GQA: query head j uses kv head j // (H / KV) (repeat_kv), litejax's q reshaped [KV, H / KV];
  * Qwen3 layer i (0-based) is MoE when (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers:
    model.moe_every and model.dense_layers.
"""
from __future__ import annotations

from litejax.config import Config, from_dict
from litejax.hf.config_fields import INFORMATIONAL, ConfigFields, rope_theta
from litejax.hf.deepseek import DEEPSEEK_V3
from litejax.hf.mapping import Family, decoder_tensors, glu_experts
from litejax.hf.weights import HFError


def _common(f: ConfigFields, dtype: str, seq_len: int | None) -> dict:
  """The fields Mixtral and Qwen3-MoE share, as litejax's model section (plus what they demand)."""
  f.expect('hidden_act', ('silu',), 'litejax experts are SwiGLU (silu)', default='silu')
  f.expect('attention_dropout', (0, 0.0), 'litejax has no dropout', default=0.0)
  d, heads = f.int('hidden_size'), f.int('num_attention_heads')
  kv = f.int('num_key_value_heads', heads)
  head_dim = f.int('head_dim', None) or d // heads
  max_pos = f.int('max_position_embeddings', 4096)
  return dict(d_model=d, num_layers=f.int('num_hidden_layers'), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
              vocab_size=f.int('vocab_size'), tie_embeddings=f.flag('tie_word_embeddings', False),
              rope_theta=rope_theta(f, 10000.0), norm_eps=f.number('rms_norm_eps', 1e-6), ffn_kind='glu',
              seq_len=seq_len or min(max_pos, 4096), dtype=dtype, param_dtype=dtype)


def _moe(f: ConfigFields, experts_key: str, h: int, renormalize: bool) -> dict:
  """litejax's moe section for flat softmax top-k routing over `experts_key` experts of hidden `h`."""
  e = f.int(experts_key) if experts_key in f.raw else f.int('num_local_experts')
  f.ignore('num_local_experts', 'num_experts')
  k = f.int('num_experts_per_tok')
  if k > e:
    raise f.error('num_experts_per_tok', f'{k} exceeds the {e} experts')
  return dict(num_tiers=1, groups_per_tier=1, experts_per_group=e, k_tier=1, k_group=1, k_expert=k, d_expert=h,
              expert_kind='glu', score='softmax', renormalize=renormalize, num_shared_experts=0)


def _build(f: ConfigFields, model: dict, moe: dict) -> Config:
  f.ignore(*INFORMATIONAL, 'architectures', 'model_type')   # family_for_hf checked both
  f.finish()
  return from_dict({'model': model, 'moe': moe})


# ---------------------------------------------------------------------------- Mixtral

def mixtral_config(f: ConfigFields, dtype: str, seq_len: int | None = None) -> Config:
  f.expect('sliding_window', (None,), 'litejax attends causally over the whole sequence', default=None)
  f.expect('router_jitter_noise', (0, 0.0), 'litejax routes without noise', default=0.0)
  model = _common(f, dtype, seq_len)
  h = f.int('intermediate_size')
  return _build(f, dict(model, moe_every=1, d_ff=h), _moe(f, 'num_local_experts', h, True))


def _flat_routing_problems(cfg: Config) -> list[str]:
  m, mc = cfg.moe, cfg.model
  out = []
  if mc.num_moe_layers == 0:
    out.append('model.moe_every: the model has no MoE layer')
  if m.num_tiers != 1 or m.groups_per_tier != 1:
    out.append(f'moe.num_tiers/groups_per_tier: {m.num_tiers}x{m.groups_per_tier} hierarchical routing; '
               'transformers\' router is flat top-k (T = G = 1)')
  if m.score != 'softmax':
    out.append(f'moe.score: {m.score}; the router is a softmax')
  if m.num_shared_experts:
    out.append(f'moe.num_shared_experts: {m.num_shared_experts} shared experts; the architecture has none')
  if m.expert_kind != 'glu':
    out.append(f'moe.expert_kind: {m.expert_kind}; the experts are SwiGLU (glu)')
  if mc.ffn_kind != 'glu' and mc.num_moe_layers < mc.num_layers:
    out.append(f'model.ffn_kind: {mc.ffn_kind}; dense layers are SwiGLU (glu)')
  return out


def mixtral_problems(cfg: Config) -> list[str]:
  mc = cfg.model
  out = _flat_routing_problems(cfg)
  if mc.num_moe_layers != mc.num_layers:
    out.append('model.moe_every/dense_layers: every Mixtral layer is MoE')
  if mc.qk_norm:
    out.append('model.qk_norm: Mixtral has no q/k norms')
  if not cfg.moe.renormalize:
    out.append('moe.renormalize: false; Mixtral renormalises its top-k weights')
  return out


def _hf_common(cfg: Config) -> dict:
  mc = cfg.model
  return {'hidden_size': mc.d_model, 'num_hidden_layers': mc.num_layers, 'num_attention_heads': mc.num_heads,
          'num_key_value_heads': mc.num_kv_heads, 'head_dim': mc.resolved_head_dim, 'vocab_size': mc.vocab_size,
          'tie_word_embeddings': mc.tie_embeddings, 'rope_theta': mc.rope_theta, 'rms_norm_eps': mc.norm_eps,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': mc.rope_theta}, 'hidden_act': 'silu',
          'attention_dropout': 0.0, 'num_experts_per_tok': cfg.moe.k_expert, 'dtype': mc.param_dtype}


def mixtral_hf_config(cfg: Config) -> dict:
  return {**_hf_common(cfg), 'intermediate_size': cfg.moe.d_expert, 'num_local_experts': cfg.moe.experts_total,
          'sliding_window': None, 'router_jitter_noise': 0.0}


MIXTRAL = Family(
    name='mixtral', architecture='MixtralForCausalLM', model_type='mixtral', to_config=mixtral_config,
    export_problems=mixtral_problems, to_hf_config=mixtral_hf_config,
    tensors=lambda cfg: decoder_tensors(cfg, qk_norm=False, moe_router='gate'),
    experts=lambda cfg: glu_experts(cfg, {'w_gate': 'w1', 'w_in': 'w3', 'w_out': 'w2'}),
    # Published Mixtral checkpoints name the MoE block `block_sparse_moe`; transformers 5 names it `mlp`.
    canonical=lambda name: name.replace('.block_sparse_moe.', '.mlp.'),
    published=lambda name: name.replace('.mlp.', '.block_sparse_moe.'))


# ---------------------------------------------------------------------------- Qwen3-MoE

def qwen3_moe_config(f: ConfigFields, dtype: str, seq_len: int | None = None) -> Config:
  f.expect('use_sliding_window', (False,), 'litejax attends causally over the whole sequence', default=False)
  f.ignore('sliding_window', 'max_window_layers')   # transformers reads them only with use_sliding_window
  f.expect('attention_bias', (False,), 'litejax attention has no biases', default=False)
  model = _common(f, dtype, seq_len)
  step = f.int('decoder_sparse_step', 1)
  only = f.take('mlp_only_layers', []) or []
  if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i for i in only):
    raise f.error('mlp_only_layers', f'must be a list of 0-based layer indices, got {only!r}')
  if any(i >= model['num_layers'] for i in only):
    raise f.error('mlp_only_layers', f'{max(only)} is not a layer (num_hidden_layers={model["num_layers"]})')
  moe = _moe(f, 'num_experts', f.int('moe_intermediate_size'), f.flag('norm_topk_prob', False))
  model = dict(model, moe_every=step, dense_layers=','.join(str(i) for i in sorted(set(only))),
               d_ff=f.int('intermediate_size'), qk_norm=True)
  return _build(f, model, moe)


def qwen3_moe_problems(cfg: Config) -> list[str]:
  out = _flat_routing_problems(cfg)
  if not cfg.model.qk_norm:
    out.append('model.qk_norm: false; Qwen3 normalises q and k per head')
  return out


def qwen3_moe_hf_config(cfg: Config) -> dict:
  mc = cfg.model
  return {**_hf_common(cfg), 'intermediate_size': mc.resolved_d_ff, 'moe_intermediate_size': cfg.moe.d_expert,
          'num_experts': cfg.moe.experts_total, 'norm_topk_prob': cfg.moe.renormalize,
          'decoder_sparse_step': mc.moe_every,
          'mlp_only_layers': sorted(i for i in range(mc.num_layers) if (i + 1) % mc.moe_every == 0
                                    and not mc.is_moe_layer(i)),
          'attention_bias': False, 'use_sliding_window': False, 'sliding_window': None}


QWEN3_MOE = Family(
    name='qwen3_moe', architecture='Qwen3MoeForCausalLM', model_type='qwen3_moe', to_config=qwen3_moe_config,
    export_problems=qwen3_moe_problems, to_hf_config=qwen3_moe_hf_config,
    tensors=lambda cfg: decoder_tensors(cfg, qk_norm=True, moe_router='gate'),
    experts=lambda cfg: glu_experts(cfg, {'w_gate': 'gate_proj', 'w_in': 'up_proj', 'w_out': 'down_proj'}))


# ---------------------------------------------------------------------------- the registry

FAMILIES: dict[str, Family] = {f.architecture: f for f in (MIXTRAL, QWEN3_MOE, DEEPSEEK_V3)}


def family_for_hf(raw: dict) -> Family:
  """The family of a config.json (by `architectures`), HFError naming the field otherwise."""
  arch = raw.get('architectures')
  if not isinstance(arch, list) or len(arch) != 1:
    raise HFError(f'config.json: architectures: expected one architecture, got {arch!r}')
  family = FAMILIES.get(arch[0])
  if family is None:
    raise HFError(f'config.json: architectures: {arch[0]} is not supported (litejax converts {", ".join(FAMILIES)})')
  if raw.get('model_type', family.model_type) != family.model_type:
    raise HFError(f'config.json: model_type: {raw["model_type"]!r} does not match {arch[0]} ({family.model_type!r})')
  return family


def family_for_config(cfg: Config, name: str | None = None) -> Family:
  """The family a litejax config exports as: `name` (a family name or architecture), else the one it maps onto
  (DeepSeek-V3 with MLA attention or pooled expert selection, Qwen3-MoE with q/k norms, else Mixtral). HFError
  naming the first field that does not map."""
  by_name = {f.name: f for f in FAMILIES.values()} | FAMILIES
  if name is not None and name not in by_name:
    raise HFError(f'--family {name}: one of {", ".join(f.name for f in FAMILIES.values())}')
  if name:
    family = by_name[name]
  elif cfg.model.attention == 'mla' or cfg.moe.expert_selection == 'pooled':
    family = DEEPSEEK_V3
  else:
    family = QWEN3_MOE if cfg.model.qk_norm else MIXTRAL
  problems = family.export_problems(cfg)
  if problems:
    raise HFError(f'the model does not map onto {family.architecture}: {problems[0]}'
                  + (f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''))
  return family
