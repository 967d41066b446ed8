"""The analytic per-token cost model of SPEC-006, in plain Python (no JAX).

FLOPs count a multiply-add as 2. Per token and per layer:
  attention projections  2·d·hd·(H + 2·KV) + 2·H·hd·d
  attention scores       4·S·H·hd                     (QKᵀ and AV over the full S×S block: the causal
                                                       mask is applied to a dense product)
  MLA (model.attention mla; litejax.model.mla: nope, rope, v per head, ranks r_q, r_kv)
    projections          q 2·d·H·(nope+rope), or 2·d·r_q + 2·r_q·H·(nope+rope) (r_q > 0);
                         kv_a 2·d·(r_kv+rope); kv_b 2·r_kv·H·(nope+v); o 2·H·v·d
    scores               2·S·H·(nope + rope + v)
    with a KV cache      (prefill and decode: W_kv_b absorbed, T = cache entries) kv_b is replaced by
                         2·H·nope·r_kv + 2·H·r_kv·v; scores 2·T·H·(2·r_kv + rope)
  router, per level      tier 2·d·T (T > 1); group 2·d·k_tier·G (G > 1); expert 2·d·k_tier·k_group·E_g
                         (moe.group_score top2_experts: no group router, and the expert level scores
                         every expert of the kept tiers' groups, 2·d·k_tier·G·E_g, to score the groups;
                         pooled selection scores the same rows as per-group selection)
  experts                K · c·d·h,  c = 4 (mlp: two matmuls) or 6 (glu: three)
  with capacity padding  (E·C / N) · c·d·h for the capacity/einsum paths (C slots for each of E experts,
                         filled or not), K · c·d·h for gather (every assignment computed, drops masked)
  dropless               (t · tiles / N) · c·d·h on CPU (config.dropless_tiles: fixed row tiles of one expert)
  combine                2·K·d   (weighted sum of the K expert outputs)
  shared experts         c·d·(num_shared·d_shared)
  dense FFN              c·d·d_ff  (non-MoE layers)
  einsum dispatch        + 4·E·C·d + 4·K·E·C   (GShard one-hot dispatch/combine; baseline only)
Once per token: unembedding 2·d·V. Norms and softmaxes are elementwise: O(d) and O(S·H), listed
under `elementwise` as an estimate, not part of the O(d²)/O(d·h) bound.

Training step = 3 × forward for matmul work (backward computes two products per forward one).
"""
from __future__ import annotations

import dataclasses

from litejax.config import Config
from litejax.model.moe.capacity import capacity, dropless_tiles, resolve_dispatch

BWD_MULTIPLIER = 3  # forward + backward (dgrad + wgrad) for every matmul


def _ffn_coef(kind: str) -> int:
  return 6 if kind == 'glu' else 4


def _ffn_params(kind: str) -> int:
  return 3 if kind == 'glu' else 2


def expert_params(cfg: Config) -> int:
  """Parameters of one routed expert (the spec's Θ per expert)."""
  return _ffn_params(cfg.moe.expert_kind) * cfg.model.d_model * cfg.moe.d_expert


def expert_flops(cfg: Config) -> int:
  """Forward FLOPs of one expert applied to one token: 2·d·h per matmul."""
  return _ffn_coef(cfg.moe.expert_kind) * cfg.model.d_model * cfg.moe.d_expert


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int
  active_per_token: int
  expert_total: int
  expert_active_per_token: int
  router_total: int
  embedding: int
  dense: int                 # everything that is not a routed expert or router weight


def attention_params(mc) -> int:
  """Parameters of one attention layer (its latent norms' scales included for MLA)."""
  d, H = mc.d_model, mc.num_heads
  if mc.attention == 'mla':
    qk = mc.qk_nope_head_dim + mc.qk_rope_head_dim
    r_q, r_kv = mc.q_lora_rank, mc.kv_lora_rank
    q = d * r_q + r_q + r_q * H * qk if r_q else d * H * qk
    kv = d * (r_kv + mc.qk_rope_head_dim) + r_kv + r_kv * H * (mc.qk_nope_head_dim + mc.v_head_dim)
    return q + kv + H * mc.v_head_dim * d
  hd = mc.resolved_head_dim
  return d * hd * (H + 2 * mc.num_kv_heads) + H * hd * d


def kv_cache_values_per_token(mc) -> int:
  """KV-cache values one token adds per attention layer (litejax.model.kv_cache.layer_entry): 2·KV·hd
  (GQA), kv_lora_rank + qk_rope_head_dim (MLA: the latent and the shared RoPE key)."""
  if mc.attention == 'mla':
    return mc.kv_lora_rank + mc.qk_rope_head_dim
  return 2 * mc.num_kv_heads * mc.resolved_head_dim


def attention_flops(mc, seq_len: int, cached: bool = False) -> tuple[int, int]:
  """(projection, score) FLOPs per token of one attention layer over `seq_len` keys (the module
  docstring's formulas); `cached`: the KV-cache form, which differs for MLA only (W_kv_b absorbed)."""
  d, H, S = mc.d_model, mc.num_heads, seq_len
  if mc.attention != 'mla':
    hd = mc.resolved_head_dim
    return 2 * d * hd * (H + 2 * mc.num_kv_heads) + 2 * H * hd * d, 4 * S * H * hd
  nope, rope, v, r_q, r_kv = mc.qk_nope_head_dim, mc.qk_rope_head_dim, mc.v_head_dim, mc.q_lora_rank, mc.kv_lora_rank
  q = 2 * d * r_q + 2 * r_q * H * (nope + rope) if r_q else 2 * d * H * (nope + rope)
  kv_b = 2 * H * r_kv * (nope + v)     # up-projection, or the absorbed W_uk and W_uv: the same count
  proj = q + 2 * d * (r_kv + rope) + kv_b + 2 * H * v * d
  return proj, (2 * S * H * (2 * r_kv + rope) if cached else 2 * S * H * (nope + rope + v))


def param_counts(cfg: Config) -> ParamCounts:
  """Total and per-token active parameter counts, without building the model."""
  mc, m = cfg.model, cfg.moe
  d = mc.d_model
  attn = attention_params(mc)
  norms = 2 * d + (2 * mc.resolved_head_dim if mc.qk_norm else 0)   # qk_norm: one scale each for q and k heads
  dense_ffn = _ffn_params(mc.ffn_kind) * d * mc.resolved_d_ff
  shared = _ffn_params(m.expert_kind) * d * m.num_shared_experts * m.resolved_d_shared
  T, G, Eg = m.num_tiers, m.groups_per_tier, m.experts_per_group
  group_router = G > 1 and m.group_score == 'router'
  router = (d * T if T > 1 else 0) + (T * d * G if group_router else 0) + T * G * d * Eg
  router_active = (d * T if T > 1 else 0) + (m.k_tier * d * G if group_router else 0) + m.router_expert_visits * d * Eg
  n_moe = mc.num_moe_layers
  n_dense = mc.num_layers - n_moe
  embedding = mc.vocab_size * d * (1 if mc.tie_embeddings else 2)
  dense = mc.num_layers * (attn + norms) + n_dense * dense_ffn + n_moe * shared + embedding + d
  expert_total = n_moe * m.experts_total * expert_params(cfg)
  expert_active = n_moe * m.k_active * expert_params(cfg)
  return ParamCounts(
      total=dense + n_moe * router + expert_total,
      active_per_token=dense + n_moe * router_active + expert_active,
      expert_total=expert_total, expert_active_per_token=expert_active, router_total=n_moe * router,
      embedding=embedding, dense=dense)


COMPONENTS = ('attention_proj', 'attention_scores', 'router_tier', 'router_group', 'router_expert',
              'experts', 'shared_experts', 'dense_ffn', 'dispatch', 'unembed')


def forward_flops_per_token(cfg: Config, tokens_per_group: int | None = None,
                            dispatch: str | None = None, seq_len: int | None = None,
                            cached: bool = False) -> dict[str, float]:
  """Whole-model forward FLOPs per token by component (summed over layers); `cached`: attention reads a
  KV cache of seq_len entries (its form differs for MLA).

  tokens_per_group: N, the tokens routed together in one MoE call on one device. None gives the
  unpadded bound (exactly K experts per token); otherwise expert work includes capacity padding
  for the dispatch path that runs at that N (`dispatch` overrides moe.dispatch).
  """
  mc, m = cfg.model, cfg.moe
  d, S = mc.d_model, seq_len or mc.seq_len
  L, n_moe = mc.num_layers, mc.num_moe_layers
  attn_proj, attn_scores = attention_flops(mc, S, cached)
  n_dense = L - n_moe
  T, G, Eg, E, K = m.num_tiers, m.groups_per_tier, m.experts_per_group, m.experts_total, m.k_active
  path = dispatch_path(cfg, tokens_per_group, dispatch)
  per_expert = expert_flops(cfg)
  if tokens_per_group is None or path == 'gather':
    expert_rows = K
  elif path == 'dropless':   # the CPU form's static tiles (litejax.model.moe.dropless); ragged_dot does exactly K
    tile, tiles = dropless_tiles(tokens_per_group * K, E)
    expert_rows = tile * tiles / tokens_per_group
  else:
    expert_rows = E * capacity(m, tokens_per_group) / tokens_per_group
  out = {
      'attention_proj': L * attn_proj,
      'attention_scores': L * attn_scores,
      'router_tier': n_moe * (2 * d * T if T > 1 else 0),
      'router_group': n_moe * (2 * d * m.k_tier * G if G > 1 and m.group_score == 'router' else 0),
      'router_expert': n_moe * 2 * d * m.router_expert_visits * Eg,
      'experts': n_moe * expert_rows * per_expert,
      'shared_experts': n_moe * _ffn_coef(m.expert_kind) * d * m.num_shared_experts * m.resolved_d_shared,
      'dense_ffn': n_dense * _ffn_coef(mc.ffn_kind) * d * mc.resolved_d_ff,
      'dispatch': n_moe * 2 * K * d,
      'unembed': 2 * d * mc.vocab_size,
  }
  if path == 'einsum' and tokens_per_group is not None:
    C = capacity(m, tokens_per_group)
    out['dispatch'] += n_moe * (4 * E * C * d + 4 * K * E * C)
  return {k: float(v) for k, v in out.items()}


def decode_flops_per_token(cfg: Config, cache_len: int, expert_rows: float | None = None,
                           router_visits: float | None = None) -> dict[str, float]:
  """Forward FLOPs of one decode step per generated token, by component (summed over layers).

  One new token per row attends over the whole cache (the step multiplies by a mask, not a shorter
  product): attention scores 4·cache_len·H·hd per layer (MLA: its absorbed form,
  2·cache_len·H·(2·r_kv + rope)). Decode routing is dropless, so expert work is
  K experts' rows (`expert_rows` overrides K: the padded rows per token of the path that runs, e.g.
  R_EP·K for expert-parallel dispatch; `router_visits` likewise overrides the k_tier·k_group (token,
  kept group) visits scored at the expert level, e.g. R_EP·k_tier·k_group where the groups' owners score
  them, litejax.model.moe.router_parallel). Projections, router, shared experts, dense FFN, combine and
  unembedding are as in `forward_flops_per_token`; nothing here depends on the number of experts
  except the router's kept branches.
  """
  if cache_len < 1:
    raise ValueError(f'cache_len: must be >= 1, got {cache_len}')
  out = forward_flops_per_token(cfg, None, seq_len=cache_len, cached=True)
  if expert_rows is not None:
    out['experts'] = float(cfg.model.num_moe_layers * expert_rows * expert_flops(cfg))
  if router_visits is not None:
    m = cfg.moe
    out['router_expert'] = float(cfg.model.num_moe_layers * 2 * cfg.model.d_model * router_visits * m.experts_per_group)
  return out


def dispatch_path(cfg: Config, tokens_per_group: int | None, dispatch: str | None = None) -> str:
  """The dispatch path that runs for N = tokens_per_group (None: what `auto` means at no padding)."""
  m = dataclasses.replace(cfg.moe, dispatch=dispatch) if dispatch else cfg.moe
  if tokens_per_group is None:
    return m.dispatch if m.dispatch != 'auto' else 'auto'
  return resolve_dispatch(m, tokens_per_group)


def elementwise_flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
  """Rough elementwise work (norms, softmaxes, activations, RoPE, the router's score softmax and
  top-k): O(d + S·H + scores) per layer; not bounded work in the spec's sense and not part of
  `forward_flops_per_token`."""
  mc, m = cfg.model, cfg.moe
  S = seq_len or mc.seq_len
  if mc.attention == 'mla':   # RoPE on the query heads' and the shared key's rope dims, two latent norms
    rotary = 6 * mc.qk_rope_head_dim * (mc.num_heads + 1) + 4 * (mc.q_lora_rank + mc.kv_lora_rank)
  else:
    rotary = 6 * mc.resolved_head_dim * (mc.num_heads + mc.num_kv_heads)
    rotary += 4 * mc.resolved_head_dim * (mc.num_heads + mc.num_kv_heads) if mc.qk_norm else 0   # q/k norms
  per_layer = 2 * 4 * mc.d_model + 5 * S * mc.num_heads + rotary
  moe = m.k_active * m.d_expert * (4 if m.expert_kind == 'glu' else 1)
  # The router's softmax / top-k / masking over every score it computes: ~9 ops per score (measured
  # with litejax.hlo.flops on a 16K-expert flat router), O(E_g) per token like its matmul.
  scores = ((m.num_tiers if m.num_tiers > 1 else 0) + (m.k_tier * m.groups_per_tier if m.groups_per_tier > 1 else 0)
            + m.router_expert_visits * m.experts_per_group)
  return float(mc.num_layers * per_layer + mc.num_moe_layers * (moe + 9 * scores) + 4 * mc.d_model)


def train_flops_per_token(cfg: Config, tokens_per_group: int | None = None) -> float:
  """Forward + backward FLOPs per token (matmul work × 3)."""
  return BWD_MULTIPLIER * sum(forward_flops_per_token(cfg, tokens_per_group).values())


def spec_formula(cfg: Config) -> dict[str, object]:
  """SPEC-006's FLOPs_token ≈ L·[a·d² + K·b·d·h] + extras, with the constants made explicit.

  a·d² is the per-layer dense work (attention projections and, averaged, dense FFN layers);
  b·d·h is one expert (b = 4 for the two-layer MLP, 6 for GLU). Attention scores (4·S·H·hd), the
  router and unembedding are listed separately: they are not in the spec's two-term form.
  """
  mc, m = cfg.model, cfg.moe
  d, L = mc.d_model, mc.num_layers
  f = forward_flops_per_token(cfg)
  a = (f['attention_proj'] + f['dense_ffn'] + f['shared_experts']) / (L * d * d)
  b = _ffn_coef(m.expert_kind) * mc.num_moe_layers / L
  two_term = L * (a * d * d + m.k_active * b * d * m.d_expert)
  extras = f['attention_scores'] + f['router_tier'] + f['router_group'] + f['router_expert'] + f['dispatch'] + f['unembed']
  return {
      'formula': 'FLOPs_token ≈ L·[a·d² + K·b·d·h] + attention_scores + router + unembed',
      'L': L, 'd': d, 'h': m.d_expert, 'K': m.k_active, 'a': a, 'b': b,
      'two_term_flops': two_term, 'extras_flops': extras, 'total_flops': two_term + extras,
  }


def summary(cfg: Config, tokens_per_group: int | None = None) -> dict[str, object]:
  """The numbers `litejax params --json` prints."""
  p = param_counts(cfg)
  flops = forward_flops_per_token(cfg, tokens_per_group)
  m = cfg.moe
  return {
      'params_total': p.total,
      'params_active_per_token': p.active_per_token,
      'params_expert_active_per_token': p.expert_active_per_token,
      'params_expert_total': p.expert_total,
      'params_router_total': p.router_total,
      'params_dense': p.dense,
      'params_per_expert': expert_params(cfg),
      'experts_total': m.experts_total * cfg.model.num_moe_layers,
      'experts_per_layer': m.experts_total,
      'moe_layers': cfg.model.num_moe_layers,
      'k_active': m.k_active,
      'flops_per_token_analytic': sum(forward_flops_per_token(cfg).values()),
      'flops_per_token_analytic_padded': sum(flops.values()),
      'train_flops_per_token_analytic': BWD_MULTIPLIER * sum(flops.values()),
      'tokens_per_group': tokens_per_group,
      'dispatch': dispatch_path(cfg, tokens_per_group),
      'capacity_per_expert': capacity(m, tokens_per_group) if tokens_per_group else None,
      'by_component': flops,
      'spec_formula': spec_formula(cfg),
  }

