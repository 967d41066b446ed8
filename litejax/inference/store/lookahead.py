"""Router lookahead candidates (pure JAX): the experts worth prefetching for a layer, given a proxy of its
router input, as the top W·K of a beam over the hierarchical router.

The exact router keeps k_tier tiers, then k_group groups per kept tier, then k_expert experts per kept
group. Applied to a proxy of the real input (the stream one or more layers earlier) that three-level
choice flips on small changes: the tier is usually right, the group less often, the expert least. So the
prefetch keeps more of every level: a beam of B = W·K paths scored by the product of the level
selection scores (score + selection bias, as the router selects; for softmax scoring without biases the
path probability p(tier)·p(group|tier)·p(expert|group)):
  tiers   the best min(B, T) allowed tiers,
  groups  of the kept tiers' groups, the best B paths,
  experts of the kept groups' experts, the best B paths.
The router's own K picks for the proxy always come first, so width 1 prefetches exactly them (what the
lookahead did before widths existed) and a wider prefetch only adds candidates.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from litejax.model.moe import routing
from litejax.config import MoEConfig

_FLOOR = 1e-30   # log of a non-positive selection score (a negative bias) ranks it last, not NaN


def _log_select(logits, bias, kind: str, allowed=None):
  """log of the selection score (score + bias) of every branch: [..., B]."""
  if allowed is not None:
    logits = jnp.where(allowed, logits, -jnp.inf)
  scores = jax.nn.softmax(logits, axis=-1) if kind == 'softmax' else jax.nn.sigmoid(logits)
  select = scores if bias is None else scores + bias
  out = jnp.log(jnp.maximum(select, _FLOOR))
  return out if allowed is None else jnp.where(allowed, out, -jnp.inf)


def _beam(x_nd, params, cfg: MoEConfig, bias, tier_mask, beam: int) -> jax.Array:
  """[N, min(beam, E)] expert ids of the best beam paths, best first."""
  n = x_nd.shape[0]
  T, G, Eg = cfg.num_tiers, cfg.groups_per_tier, cfg.experts_per_group
  x32 = x_nd.astype(jnp.float32)
  bias = bias or {}
  if T > 1:
    allowed = None if tier_mask is None else jnp.asarray(tier_mask, bool)
    lt = _log_select(x32 @ params['tier'].astype(jnp.float32), bias.get('tier'), cfg.score, allowed)
    score_nt, tier_nt = routing.top_k(lt, min(beam, T))
  else:
    score_nt, tier_nt = jnp.zeros((n, 1)), jnp.zeros((n, 1), jnp.int32)
  if G > 1:
    score_ng, group_ng = _extend(x32, params['group'], tier_nt, score_nt, bias.get('group'), G, beam, cfg.score)
  else:
    score_ng, group_ng = score_nt, tier_nt
  return _extend(x32, params['expert'], group_ng, score_ng, bias.get('expert'), Eg, beam, cfg.score)[1]


def _extend(x32, table, parent_np, score_np, bias, children: int, beam: int, kind: str):
  """One level of the beam: each kept parent's `children` branches scored with its router rows
  (table[parent]: [d, children]), added to the parent's path score; the best `beam` paths as
  (scores [N, B'], child ids [N, B'], id = parent·children + branch)."""
  n = x32.shape[0]
  w_npdc = table.astype(jnp.float32)[parent_np]
  id_npc = parent_np[:, :, None] * children + jnp.arange(children)
  lc = _log_select(jnp.einsum('nd,npdc->npc', x32, w_npdc), None if bias is None else bias[id_npc], kind)
  path = (score_np[:, :, None] + lc).reshape(n, -1)
  score_nb, pick = routing.top_k(path, min(beam, path.shape[1]))
  return score_nb, jnp.take_along_axis(id_npc.reshape(n, -1), pick, axis=1)


def candidates(x_nd: jax.Array, params, cfg: MoEConfig, bias=None, *, tier_mask=None, width: int = 1) -> jax.Array:
  """int32 [N, W·K] (W = width, capped at E/K): the router's own K picks for x_nd, then the best beam
  paths (module docstring) that are not among them. Entries past the distinct candidates repeat the
  first pick (harmless duplicates: a prefetch reads each expert once)."""
  k = cfg.k_active
  exact_nk = routing.route(x_nd, params, cfg, bias, tier_mask=tier_mask).expert_nk
  if width <= 1:
    return exact_nk
  total = min(width * k, cfg.experts_total)
  beam_nb = _beam(x_nd, params, cfg, bias, tier_mask, total)
  # drop the beam entries already picked, keeping the beam's order; then take the first total - K
  dup_nb = (beam_nb[:, :, None] == exact_nk[:, None, :]).any(-1)
  rank_nb = jnp.where(dup_nb, beam_nb.shape[1], jnp.arange(beam_nb.shape[1]))
  order_nb = jnp.argsort(rank_nb, axis=1, stable=True)
  extra_nb = jnp.take_along_axis(beam_nb, order_nb, axis=1)
  extra_nb = jnp.where(jnp.take_along_axis(dup_nb, order_nb, axis=1), exact_nk[:, :1], extra_nb)
  return jnp.concatenate([exact_nk, extra_nb[:, :total - k]], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 5))
def candidates_jit(x_nd, params, cfg, bias, tier_mask, width):
  return candidates(x_nd, params, cfg, bias, tier_mask=tier_mask, width=width)
