"""Hierarchical top-K routing: tiers -> groups -> experts, as pure functions.

Each token keeps `k_tier` of T tiers; only inside those tiers are the G groups scored, keeping
`k_group`; only inside the kept groups are the E_g experts scored, keeping `k_expert`. Router FLOPs per
token are therefore 2·d·(T + k_tier·G + k_tier·k_group·E_g), never 2·d·(T·G·E_g).

A level with a single branch (T = 1 or G = 1) has no router weights and gate 1, so T = G = 1 is plain
flat top-k routing: softmax over experts -> top-k -> renormalise (Mixtral).

Expert ids are global: expert = (tier * G + group) * E_g + local_expert, so the experts of one group
are contiguous (which lets groups align with expert-parallel ranks).

Assignment order inside the K slots of a token is (tier rank, group rank, expert rank), best first.

DeepSeek-V3's group-limited routing is two options of this hierarchy (litejax.config.MoEConfig):
  expert_selection: pooled   the last level keeps k_expert experts per kept tier, pooled over the
                             experts of its kept groups (not k_expert per group): K = k_tier·k_expert,
                             order (tier rank, expert rank). A softmax score normalises over the pool.
  group_score: top2_experts  no group router: every expert of the kept tiers' G groups is scored first
                             (router FLOPs 2·d·k_tier·G·E_g), a group scores the sum of its two best
                             selection scores (score + expert bias), the best k_group are kept, gate 1.
and `routed_scale` multiplies the combine weights after renormalisation (routed_scaling_factor).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from litejax.model.moe import row_grad as sparse_grad
from litejax.config import MoEConfig
from litejax.model.moe import router_parallel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """What the router decided for N tokens (K = MoEConfig.k_active assignments each)."""
  expert_nk: jax.Array           # int32 [N, K] global expert id of each assignment
  weight_nk: jax.Array           # f32 [N, K] combine weight (product of level gates, maybe renormalised)
  group_nk: jax.Array            # int32 [N, K] global group id (tier * G + group) of each assignment
  tier_nk: jax.Array             # int32 [N, K] tier id of each assignment
  load_balance_loss: jax.Array   # f32 [3] Switch loss per level (tier, group, expert); 0 for 1-branch levels
  z_loss: jax.Array              # f32 [] ST-MoE z-loss summed over scored levels
  tokens_per_expert: jax.Array   # int32 [E] assignments per expert before capacity drops
  tokens_per_group: jax.Array    # int32 [T·G] selections per group (tokens that kept it)
  tokens_per_tier: jax.Array     # int32 [T] selections per tier
  # Sparse training only (`route(row_deltas=...)`): the touched rows of each gathered router table,
  # {'router_group' | 'router_expert': int32 [u] ascending, padded with the table's row count}.
  touched: dict[str, jax.Array] | None = None


def _scores(logits: jax.Array, kind: str) -> jax.Array:
  return jax.nn.softmax(logits, axis=-1) if kind == 'softmax' else jax.nn.sigmoid(logits)


# Above this k the argmax rounds (k passes over the row) cost more than one sort.
_ARGMAX_TOP_K_MAX = 16


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k over the last axis, best first, ties to the lower index (as lax.top_k). x: finite scores.

  Not lax.top_k: XLA's SPMD partitioner gathers the whole batch in front of a TopK when the batch
  axis is sharded, so every rank would route every token. For the small k of routing, k rounds of
  argmax-and-mask are reductions along the last axis, which partition cleanly over the batch and
  cost O(k·B) per row; a full stable sort (the fallback for large k) is O(B log B) and on XLA:CPU
  far slower than the argmax rounds at small k (experiments/profile_moe.py times both).
  """
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  if k > _ARGMAX_TOP_K_MAX:
    neg_sorted, idx_sorted = jax.lax.sort((-x, iota), dimension=x.ndim - 1, num_keys=1, is_stable=True)
    return -neg_sorted[..., :k], idx_sorted[..., :k]
  values, indices = [], []
  for _ in range(k):
    i = jnp.argmax(x, axis=-1).astype(jnp.int32)          # first maximum: ties to the lower index
    values.append(jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0])
    indices.append(i)
    x = jnp.where(iota == i[..., None], -jnp.inf, x)
  return jnp.stack(values, -1), jnp.stack(indices, -1)


def _level(logits_npb: jax.Array, bias_npb: jax.Array | None, k: int, kind: str,
           allowed_b: jax.Array | None = None):
  """Top-k over the last axis. Selection uses score + bias; the gate is the unbiased score.
  allowed_b: bool [B], the branches that may be chosen (None: all); the others get logit -inf, so a
  softmax gate renormalises over the allowed branches and they are never selected."""
  if allowed_b is not None:
    logits_npb = jnp.where(allowed_b, logits_npb.astype(jnp.float32), -jnp.inf)
  scores = _scores(logits_npb.astype(jnp.float32), kind)
  select = scores if bias_npb is None else scores + bias_npb
  if allowed_b is not None:
    select = jnp.where(allowed_b, select, -jnp.inf)
  _, idx = top_k(select, k)
  gate = jnp.take_along_axis(scores, idx, axis=-1)
  return idx, gate, scores


def _switch_loss(branch_ids: jax.Array, scores_npb: jax.Array, parent_np: jax.Array | None,
                 num_parents: int, normalized: bool = False) -> jax.Array:
  """Switch load-balance loss B·Σ_b f_b·P_b over all B branches of a level.

  f_b: fraction of selections that chose branch b. P_b: share of router probability given to b,
  summed only over the branches that were scored (children of kept parents; branch id =
  parent · children + child). Both sum to 1, so perfectly uniform routing gives 1.0. Scores are
  normalised per parent so sigmoid levels work too (`normalized`: the caller normalised them, over a
  pool of several parents' children). parent_np None: one parent, every row scored.
  """
  children = scores_npb.shape[-1]
  num_branches = num_parents * children
  counts = jnp.zeros((num_branches,), jnp.float32).at[branch_ids.reshape(-1)].add(1.0)
  f = counts / jnp.maximum(counts.sum(), 1.0)
  probs = scores_npb if normalized else scores_npb / jnp.maximum(scores_npb.sum(-1, keepdims=True), 1e-9)
  if parent_np is None:
    p = probs.reshape(-1, children).sum(0)
  else:   # one scatter of a whole row of children per kept parent, not one per element
    p = jnp.zeros((num_parents, children), jnp.float32).at[parent_np.reshape(-1)].add(
        probs.reshape(-1, children)).reshape(-1)
  p = p / jnp.maximum(p.sum(), 1e-9)
  return num_branches * jnp.sum(jax.lax.stop_gradient(f) * p)


def _z(logits: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def _child_logits(x_nd: jax.Array, w_pdb: jax.Array, parent_np: jax.Array) -> jax.Array:
  """Logits of the children of each kept parent: [N, P_kept, B], scoring only those children.

  When every parent is kept (e.g. one parent) a plain matmul is the same work without the gather.
  """
  num_parents = w_pdb.shape[0]
  if parent_np.shape[1] == num_parents:
    logits_npb = jnp.einsum('nd,pdb->npb', x_nd, w_pdb.astype(x_nd.dtype))
    return jnp.take_along_axis(logits_npb, parent_np[:, :, None], axis=1)
  # Only the kept parents' router weights, gathered per (token, parent) and rematerialised in the backward
  # rather than saved ([N, P_kept, d, B] per layer).
  return jax.checkpoint(lambda x, w, p: jnp.einsum('nd,npdb->npb', x, w[p].astype(x.dtype)))(x_nd, w_pdb, parent_np)


def _touched_child_logits(x_nd, w_pdb, parent_np, delta_udb, touched, name):
  """`_child_logits` through the touched parent rows only (sparse training): the rows
  w_pdb[ids_u] + delta_udb, differentiable in delta_udb, with the parents' ids recorded in `touched`."""
  if delta_udb is None:
    return _child_logits(x_nd, w_pdb, parent_np)
  ids_u, slot = sparse_grad.unique_ids(parent_np.reshape(-1), delta_udb.shape[0], w_pdb.shape[0])
  touched[name] = ids_u
  rows_udb = sparse_grad.touched_rows(w_pdb, ids_u, delta_udb)
  return _child_logits(x_nd, rows_udb, slot.reshape(parent_np.shape))


def _expert_logits(x32, w_pdb, group_np, delta_udb, touched, cfg: MoEConfig):
  """Level-3 logits [N, kept, E_g] and the keep mask of the visits (None: nothing can drop).

  A gathered router_expert split by group over the expert ranks of the ambient mesh is scored on the
  groups' owners (litejax.model.moe.router_parallel); otherwise locally from the whole table.
  """
  mesh = None
  if group_np.shape[1] < w_pdb.shape[0]:   # the level gathers kept groups (a RowParam table)
    mesh = router_parallel.sharded_mesh(w_pdb.shape[0], x32.shape[0])
  if mesh is None:
    return _touched_child_logits(x32, w_pdb, group_np, delta_udb, touched, 'router_expert'), None
  logits, keep, ids = router_parallel.expert_logits(x32, w_pdb, group_np, cfg, mesh, delta_udb)
  if ids is not None:
    touched['router_expert'] = ids
  return logits, keep


def route(x_nd: jax.Array, params: dict[str, Any], cfg: MoEConfig,
          bias: dict[str, jax.Array] | None = None, *, tier_mask: Any = None,
          row_deltas: dict[str, jax.Array] | None = None) -> Routing:
  """Routes N tokens hierarchically.

  Args:
    x_nd: [N, d] token activations (compute dtype; router math is done in f32).
    params: router weights: 'tier' [d, T] (if T > 1), 'group' [T, d, G] (if G > 1 and the groups have a
      router: group_score router), 'expert' [T·G, d, E_g].
    cfg: the MoE config.
    bias: optional selection-only biases (sigmoid scoring): 'tier' [T], 'group' [T·G], 'expert' [E].
    tier_mask: optional bool [T], the TierSet: the routing tiers this request may use. The others are
      masked before the top-k_tier choice (logit -inf: never chosen, and a softmax tier gate
      renormalises over the allowed tiers). None: every tier.
    row_deltas: sparse training: zero perturbations 'group' [u, d, G] / 'expert' [u, d, E_g] of the
      gathered router tables; those levels then read only the u touched parent rows (litejax.model.moe.row_grad)
      and the returned Routing's `touched` holds their ids. Same outputs as without.
  """
  row_deltas = row_deltas or {}
  touched: dict[str, jax.Array] = {}
  n = x_nd.shape[0]
  T, G, Eg = cfg.num_tiers, cfg.groups_per_tier, cfg.experts_per_group
  allowed_t = None if tier_mask is None else _check_tier_mask(tier_mask, cfg)
  bias = bias or {}
  x32 = x_nd.astype(jnp.float32)  # router decisions in f32 even under bf16 compute
  z_terms, lb = [], []

  # Level 1: tiers.
  if T > 1:
    with jax.named_scope('router_tier'):   # scopes name the FLOPs for litejax.analysis.bound
      logits_nt = x32 @ params['tier'].astype(jnp.float32)
    b = bias.get('tier')
    tier_nk, gate_t, scores_t = _level(logits_nt, None if b is None else b[None, :], cfg.k_tier, cfg.score,
                                       allowed_t)
    if allowed_t is not None:   # the z-loss of the logits the choice saw
      logits_nt = jnp.where(allowed_t, logits_nt, -jnp.inf)
    z_terms.append(_z(logits_nt))
    lb.append(_switch_loss(tier_nk, scores_t, None, 1))
  else:
    tier_nk = jnp.zeros((n, 1), jnp.int32)
    gate_t = jnp.ones((n, 1), jnp.float32)
    lb.append(jnp.zeros((), jnp.float32))

  # Level 2: groups inside kept tiers.
  keep_ng = None
  if G > 1 and cfg.group_score == 'top2_experts':   # the expert level is scored here, for every group
    group_nk, logits_nge, logits_nte = _top2_groups(x32, params['expert'], tier_nk, bias.get('expert'), cfg)
    gate_tg = jnp.repeat(gate_t, cfg.k_group, axis=1)
    lb.append(jnp.zeros((), jnp.float32))   # no router of its own: balanced by the experts' loss and bias
  elif G > 1:
    with jax.named_scope('router_group'):
      logits_ntg = _touched_child_logits(x32, params['group'], tier_nk, row_deltas.get('group'), touched,
                                         'router_group')
    scored = tier_nk[:, :, None] * G + jnp.arange(G)
    b = bias.get('group')
    local_g, gate_g, scores_g = _level(logits_ntg, None if b is None else b[scored], cfg.k_group, cfg.score)
    group_nk = (tier_nk[:, :, None] * G + local_g).reshape(n, -1)
    gate_tg = (gate_t[:, :, None] * gate_g).reshape(n, -1)
    z_terms.append(_z(logits_ntg))
    lb.append(_switch_loss(group_nk, scores_g, tier_nk, T))
  else:
    group_nk = tier_nk
    gate_tg = gate_t
    lb.append(jnp.zeros((), jnp.float32))

  # Level 3: experts inside kept groups.
  if G == 1 or cfg.group_score == 'router':
    with jax.named_scope('router_expert'):
      logits_nge, keep_ng = _expert_logits(x32, params['expert'], group_nk, row_deltas.get('expert'), touched, cfg)
    logits_nte = logits_nge.reshape(n, cfg.k_tier, -1) if cfg.expert_selection == 'pooled' else logits_nge
  scored = group_nk[:, :, None] * Eg + jnp.arange(Eg)
  b = bias.get('expert')
  if cfg.expert_selection == 'pooled':
    expert_nk, weight_nk, probs_nge = _pooled(logits_nge, None if b is None else b[scored], scored, keep_ng,
                                              gate_tg, cfg)
  else:
    local_e, gate_e, scores_e = _level(logits_nge, None if b is None else b[scored], cfg.k_expert, cfg.score)
    if keep_ng is not None:   # a visit its group's owner had no slot for: dropped (weight 0)
      gate_e = jnp.where(keep_ng[:, :, None], gate_e, 0.0)
    expert_nk = (group_nk[:, :, None] * Eg + local_e).reshape(n, -1)
    weight_nk = (gate_tg[:, :, None] * gate_e).reshape(n, -1)
  z_terms.append(_z(logits_nte))
  num_experts = T * G * Eg
  parents = group_nk if T * G > 1 else None
  if num_experts == 1:
    lb.append(jnp.zeros((), jnp.float32))
  elif cfg.expert_selection == 'pooled':
    lb.append(_switch_loss(expert_nk, probs_nge, parents, T * G, normalized=True))
  else:
    lb.append(_switch_loss(expert_nk, scores_e, parents, T * G))

  if cfg.renormalize:
    weight_nk = weight_nk / jnp.maximum(weight_nk.sum(-1, keepdims=True), 1e-9)
  if cfg.routed_scale != 1.0:
    weight_nk = weight_nk * cfg.routed_scale
  if cfg.expert_selection == 'pooled':
    group_k, tier_k = expert_nk // Eg, jnp.repeat(tier_nk, cfg.k_expert, axis=1)
  else:
    group_k = jnp.repeat(group_nk, cfg.k_expert, axis=1)
    tier_k = jnp.repeat(tier_nk, cfg.k_group * cfg.k_expert, axis=1)
  return Routing(
      expert_nk=expert_nk.astype(jnp.int32), weight_nk=weight_nk, group_nk=group_k.astype(jnp.int32),
      tier_nk=tier_k.astype(jnp.int32), load_balance_loss=jnp.stack(lb), z_loss=sum(z_terms),
      tokens_per_expert=_counts(expert_nk, num_experts), tokens_per_group=_counts(group_nk, T * G),
      tokens_per_tier=_counts(tier_nk, T), touched=touched or None)


def _top2_groups(x32, w_pdb, tier_nk, bias_e, cfg: MoEConfig):
  """DeepSeek-V3's group choice (group_score top2_experts): every expert of the kept tiers' G groups is
  scored, a group's score is the sum of its two best selection scores (sigmoid + expert bias), and each
  kept tier keeps its best k_group groups. Returns (group_nk [N, kt·kg] global ids, the kept groups'
  logits [N, kt·kg, E_g], every candidate's logits [N, kt, G·E_g] for the z-loss)."""
  n = x32.shape[0]
  G, Eg, kt = cfg.groups_per_tier, cfg.experts_per_group, cfg.k_tier
  cand_nc = (tier_nk[:, :, None] * G + jnp.arange(G)).reshape(n, -1)       # every group of the kept tiers
  with jax.named_scope('router_expert'):   # k_tier = T (config): all rows, never a gathered table
    logits_nce = _child_logits(x32, w_pdb, cand_nc)
  select = _scores(logits_nce.astype(jnp.float32), 'sigmoid')
  if bias_e is not None:
    select = select + bias_e[cand_nc[:, :, None] * Eg + jnp.arange(Eg)]
  group_score_ntg = top_k(select, 2)[0].sum(-1).reshape(n, kt, G)
  _, local_g = top_k(group_score_ntg, cfg.k_group)                           # [N, kt, kg]
  visit_nv = (jnp.arange(kt)[:, None] * G + local_g).reshape(n, -1)          # row in cand_nc
  logits_nve = jnp.take_along_axis(logits_nce, visit_nv[:, :, None], axis=1)
  return (tier_nk[:, :, None] * G + local_g).reshape(n, -1), logits_nve, logits_nce.reshape(n, kt, -1)


def _pooled(logits_nve, bias_nve, scored_nve, keep_nv, gate_nv, cfg: MoEConfig):
  """The pooled last level: each kept tier's k_expert best experts over all its kept groups' experts.

  logits/bias/scored (global expert ids): [N, V, E_g] over the V = k_tier·k_group kept groups (in tier
  order); keep_nv: visits the router's owner scored (None: all); gate_nv: the tier·group gate per visit.
  Returns (expert_nk [N, kt·ke], weight_nk (unnormalised), the pool-normalised scores [N, V, E_g])."""
  n, v, eg = logits_nve.shape
  kt = cfg.k_tier
  scores_ntc = _scores(logits_nve.reshape(n, kt, -1).astype(jnp.float32), cfg.score)   # the pool: kg·E_g
  select = scores_ntc if bias_nve is None else scores_ntc + bias_nve.reshape(n, kt, -1)
  if keep_nv is not None:   # a visit its group's owner had no slot for: never chosen
    keep_ntc = jnp.repeat(keep_nv, eg, axis=1).reshape(n, kt, -1)
    select = jnp.where(keep_ntc, select, -jnp.inf)
  _, idx_ntk = top_k(select, cfg.k_expert)
  gate = jnp.take_along_axis(scores_ntc, idx_ntk, axis=-1) * jnp.take_along_axis(
      gate_nv.reshape(n, kt, -1), idx_ntk // eg, axis=-1)
  if keep_nv is not None:   # fewer kept visits than k_expert picks: the rest weigh 0
    gate = jnp.where(jnp.take_along_axis(keep_ntc, idx_ntk, axis=-1), gate, 0.0)
  expert_ntk = jnp.take_along_axis(scored_nve.reshape(n, kt, -1), idx_ntk, axis=-1)
  probs = scores_ntc / jnp.maximum(scores_ntc.sum(-1, keepdims=True), 1e-9)
  return expert_ntk.reshape(n, -1), gate.reshape(n, -1), probs.reshape(n, v, eg)


def _check_tier_mask(tier_mask: Any, cfg: MoEConfig) -> jax.Array:
  """The mask as a bool [T] array; a concrete mask must allow at least k_tier tiers."""
  mask = jnp.asarray(tier_mask, bool)
  if mask.shape != (cfg.num_tiers,):
    raise ValueError(f'tier_mask: must be bool [num_tiers={cfg.num_tiers}], got shape {mask.shape}')
  if not isinstance(mask, jax.core.Tracer) and int(mask.sum()) < cfg.k_tier:
    raise ValueError(f'tier_mask: allows {int(mask.sum())} tiers, fewer than moe.k_tier={cfg.k_tier}')
  return mask


def _counts(ids: jax.Array, num_branches: int) -> jax.Array:
  return jnp.zeros((num_branches,), jnp.int32).at[ids.reshape(-1)].add(1)


def update_selection_bias(bias: jax.Array, tokens_per_branch: jax.Array, rate: float,
                          num_parents: int = 1) -> jax.Array:
  """Loss-free balancing (DeepSeek-V3): raise the bias of under-loaded branches, lower over-loaded.

  bias <- bias + rate · sign(mean_load - load), the mean taken over the siblings of each branch
  (branch id = parent · children + child; one parent for the tier level). A branch only competes
  with its siblings (top-k among the children of a kept parent), so a shift common to all children
  of a parent would change no selection; comparing with the siblings' mean balances each parent's
  children, and a level with one child per parent (T = 1, G = 1) stays at zero. Only selection sees
  the bias, never the gate.
  """
  load_pc = tokens_per_branch.astype(jnp.float32).reshape(num_parents, -1)
  step_pc = jnp.sign(load_pc.mean(axis=-1, keepdims=True) - load_pc)
  return bias + rate * step_pc.reshape(bias.shape)


def update_selection_biases(bias: dict[str, jax.Array], r: Routing | Any, rate: float,
                            cfg: MoEConfig) -> dict[str, jax.Array]:
  """One loss-free balancing step on every level: 'tier' [T], 'group' [T·G], 'expert' [E], each
  from its own load (`r` has the fields tokens_per_tier / _group / _expert, e.g. a Routing)."""
  T, G = cfg.num_tiers, cfg.groups_per_tier
  top2 = cfg.group_score == 'top2_experts'   # the expert bias then picks groups too; no group bias is read
  # An expert competes with its group's experts, or with its tier's where they pool or score the groups.
  expert_parents = T if top2 or cfg.expert_selection == 'pooled' else T * G
  return {
      'tier': update_selection_bias(bias['tier'], r.tokens_per_tier, rate),
      'group': bias['group'] if top2 else update_selection_bias(bias['group'], r.tokens_per_group, rate, T),
      'expert': update_selection_bias(bias['expert'], r.tokens_per_expert, rate, expert_parents),
  }
