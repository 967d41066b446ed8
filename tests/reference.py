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
                       tier_mask=None):
  """Scores every branch densely, then selects level by level. Returns (experts [N,K], weights [N,K]).

  bias: optional selection biases {'tier' [T], 'group' [T·G], 'expert' [E]}: selection ranks
  score + bias, the weight is the product of the unbiased scores.
  tier_mask: optional bool [T] (a TierSet): tier scores are computed over the allowed tiers only
  (softmax over them; sigmoid unchanged) and only they are selected."""
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
