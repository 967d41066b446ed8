"""Plain NumPy references for routing and MoE outputs (no JAX)."""
import numpy as np


def softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def topk(v, k):
  """Indices of the k largest values, best first (ties: lower index first, as lax.top_k)."""
  order = np.argsort(-v, kind='stable')
  return order[:k]


def hierarchical_route(x_nd, params, T, G, Eg, kt, kg, ke, score='softmax', renormalize=True, bias=None,
                       tier_mask=None, selection='per_group', group_score='router', routed_scale=1.0):
  """Scores every branch densely, then selects level by level. Returns (experts [N,K], weights [N,K]).

  bias: optional selection biases {'tier' [T], 'group' [T·G], 'expert' [E]}: selection ranks
  score + bias, the weight is the product of the unbiased scores.
  tier_mask: optional bool [T] (a TierSet): tier scores are computed over the allowed tiers only
  (softmax over them; sigmoid unchanged) and only they are selected.
  selection 'pooled' / group_score 'top2_experts' / routed_scale: DeepSeek-V3's group-limited routing
  (`pooled_tier`, `top2_groups`), written out per token."""
  if selection == 'pooled' or group_score == 'top2_experts':
    return _route_variants(x_nd, params, T, G, Eg, kt, kg, ke, score, renormalize, bias, selection, group_score,
                           routed_scale)
  zero = {'tier': np.zeros(T), 'group': np.zeros(T * G), 'expert': np.zeros(T * G * Eg)}
  bias = zero if bias is None else {k: np.asarray(v, np.float64) for k, v in bias.items()}
  f = softmax if score == 'softmax' else sigmoid
  n = x_nd.shape[0]
  experts, weights = [], []
  for i in range(n):
    x = x_nd[i].astype(np.float64)
    tier_s = f(x @ params['tier']) if T > 1 else np.ones(1)
    select_t = tier_s + bias['tier']
    if tier_mask is not None and T > 1:
      allowed = np.flatnonzero(tier_mask)
      tier_s = np.zeros(T)
      tier_s[allowed] = f(x @ params['tier'][:, allowed])
      select_t = np.full(T, -np.inf)
      select_t[allowed] = tier_s[allowed] + bias['tier'][allowed]
    tiers = topk(select_t, kt) if T > 1 else [0]
    ex, wt = [], []
    for t in tiers:
      group_s = f(x @ params['group'][t]) if G > 1 else np.ones(1)
      groups = topk(group_s + bias['group'][t * G:(t + 1) * G], kg) if G > 1 else [0]
      for g in groups:
        gid = t * G + g
        exp_s = f(x @ params['expert'][gid])
        for e in topk(exp_s + bias['expert'][gid * Eg:(gid + 1) * Eg], ke):
          ex.append(gid * Eg + e)
          wt.append(tier_s[t] * group_s[g] * exp_s[e])
    wt = np.array(wt)
    if renormalize:
      wt = wt / wt.sum()
    experts.append(ex)
    weights.append(wt)
  return np.array(experts), np.array(weights)


def top2_groups(x, w_expert, t, G, Eg, kg, bias_e):
  """DeepSeek-V3's group choice in tier t: each group scores the sum of its two best sigmoid(x·w) + bias."""
  gscore = []
  for g in range(G):
    gid = t * G + g
    select = sigmoid(x @ w_expert[gid]) + bias_e[gid * Eg:(gid + 1) * Eg]
    gscore.append(np.sort(select)[-2:].sum())
  return topk(np.array(gscore), kg)


def pooled_tier(x, w_expert, gids, gates, Eg, ke, score, bias_e):
  """The pooled last level of one kept tier: the ke best experts over all kept groups' experts (scores
  normalised over that pool for softmax). Returns ([expert ids], [weights = group gate · expert score])."""
  ids = np.concatenate([gid * Eg + np.arange(Eg) for gid in gids])
  logits = np.concatenate([x @ w_expert[gid] for gid in gids])
  s = softmax(logits) if score == 'softmax' else sigmoid(logits)
  gate = np.repeat(np.asarray(gates, np.float64), Eg)
  pick = topk(s + bias_e[ids], ke)
  return list(ids[pick]), list(gate[pick] * s[pick])


def _route_variants(x_nd, params, T, G, Eg, kt, kg, ke, score, renormalize, bias, selection, group_score,
                    routed_scale):
  zero = {'tier': np.zeros(T), 'group': np.zeros(T * G), 'expert': np.zeros(T * G * Eg)}
  bias = zero if bias is None else {k: np.asarray(v, np.float64) for k, v in bias.items()}
  f = softmax if score == 'softmax' else sigmoid
  experts, weights = [], []
  for x in x_nd.astype(np.float64):
    tier_s = f(x @ params['tier']) if T > 1 else np.ones(1)
    ex, wt = [], []
    for t in (topk(tier_s + bias['tier'], kt) if T > 1 else [0]):
      if G == 1:
        groups, gates = [0], [1.0]
      elif group_score == 'top2_experts':
        groups = top2_groups(x, params['expert'], t, G, Eg, kg, bias['expert'])
        gates = [1.0] * kg
      else:
        group_s = f(x @ params['group'][t])
        groups = topk(group_s + bias['group'][t * G:(t + 1) * G], kg)
        gates = group_s[groups]
      gids = [t * G + g for g in groups]
      if selection == 'pooled':
        e, w = pooled_tier(x, params['expert'], gids, gates, Eg, ke, score, bias['expert'])
      else:
        e, w = [], []
        for gid, gate in zip(gids, gates):
          s = f(x @ params['expert'][gid])
          for j in topk(s + bias['expert'][gid * Eg:(gid + 1) * Eg], ke):
            e.append(gid * Eg + j)
            w.append(gate * s[j])
      ex += e
      wt += [tier_s[t] * v for v in w]
    wt = np.array(wt)
    if renormalize:
      wt = wt / wt.sum()
    experts.append(ex)
    weights.append(wt * routed_scale)
  return np.array(experts), np.array(weights)


def expert_apply(x_d, w, e, kind):
  h = x_d @ w['w_in'][e]
  if kind == 'glu':
    g = x_d @ w['w_gate'][e]
    h = g / (1 + np.exp(-g)) * h
  else:
    h = np.maximum(h, 0)
  return h @ w['w_out'][e]


def dense_moe(x_nd, experts_nk, weights_nk, keep_nk, w, kind):
  """Runs EVERY expert on every token, then masks to the chosen, kept ones."""
  n, d = x_nd.shape
  E = w['w_in'].shape[0]
  all_out = np.stack([np.stack([expert_apply(x_nd[i], w, e, kind) for e in range(E)]) for i in range(n)])
  y = np.zeros((n, d))
  for i in range(n):
    for k in range(experts_nk.shape[1]):
      if keep_nk[i, k]:
        y[i] += weights_nk[i, k] * all_out[i, experts_nk[i, k]]
  return y


def capacity_keep(experts_nk, cap):
  """Slot-major priority: all first choices (in token order), then all second choices, ..."""
  n, k = experts_nk.shape
  used = {}
  pos = np.zeros((n, k), np.int64)
  for j in range(k):
    for i in range(n):
      e = int(experts_nk[i, j])
      pos[i, j] = used.get(e, 0)
      used[e] = pos[i, j] + 1
  return pos, pos < cap
