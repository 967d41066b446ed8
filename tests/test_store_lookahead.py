"""Lookahead candidates (litejax.inference.store.lookahead) against a plain NumPy beam over the hierarchical router:
width 1 is the router's own choice, wider adds the best beam paths it lacks."""
import dataclasses

import numpy as np
import pytest

from litejax.model.moe import routing
from litejax.inference.store.lookahead import candidates_jit
from store_helpers import small_cfg

T, G, EG, D, N = 3, 4, 5, 8, 6


def moe_cfg(score='softmax'):
  m = small_cfg().moe
  return dataclasses.replace(m, num_tiers=T, groups_per_tier=G, experts_per_group=EG, k_tier=1, k_group=1,
                             k_expert=2, score=score)


@pytest.fixture(scope='module')
def router():
  rng = np.random.default_rng(0)
  params = {'tier': rng.normal(size=(D, T)).astype(np.float32),
            'group': rng.normal(size=(T, D, G)).astype(np.float32),
            'expert': rng.normal(size=(T * G, D, EG)).astype(np.float32)}
  bias = {'tier': rng.normal(size=T).astype(np.float32) * 0.1,
          'group': rng.normal(size=T * G).astype(np.float32) * 0.1,
          'expert': rng.normal(size=T * G * EG).astype(np.float32) * 0.1}
  return rng.normal(size=(N, D)).astype(np.float32), params, bias


def _log_select(logits, bias, kind, allowed=None):
  if allowed is not None:
    logits = np.where(allowed, logits, -np.inf)
  if kind == 'softmax':
    e = np.exp(logits - logits.max())
    s = e / e.sum()
  else:
    s = 1 / (1 + np.exp(-logits))
  sel = s if bias is None else s + bias
  out = np.log(np.maximum(sel, 1e-30))
  return out if allowed is None else np.where(allowed, out, -np.inf)


def _top(scores, k):
  return list(np.argsort(-scores, kind='stable')[:k])


def beam_ref(x, p, bias, kind, beam, allowed=None):
  """One token's beam (best first), in NumPy."""
  bias = bias or {}
  lt = _log_select(x @ p['tier'], bias.get('tier'), kind, allowed)
  tiers = [(lt[t], t) for t in _top(lt, min(beam, T))]
  paths = [(s + v, t * G + g) for s, t in tiers
           for g, v in enumerate(_log_select(x @ p['group'][t], None if not bias else
                                             bias['group'][t * G:(t + 1) * G], kind))]
  groups = [paths[i] for i in _top(np.array([s for s, _ in paths]), min(beam, len(paths)))]
  paths = [(s + v, g * EG + e) for s, g in groups
           for e, v in enumerate(_log_select(x @ p['expert'][g], None if not bias else
                                             bias['expert'][g * EG:(g + 1) * EG], kind))]
  return [paths[i][1] for i in _top(np.array([s for s, _ in paths]), min(beam, len(paths)))]


@pytest.mark.parametrize('score,with_bias,mask,width', [('softmax', False, None, 1), ('softmax', False, None, 3),
                                                         ('sigmoid', True, None, 6),
                                                         ('softmax', False, (True, False, True), 3)])
def test_candidates_match_numpy_beam(router, score, with_bias, mask, width):
  x, p, b = router
  cfg = moe_cfg(score)
  bias = b if with_bias else None
  tm = None if mask is None else np.asarray(mask)
  got = np.asarray(candidates_jit(x, p, cfg, bias, tm, width))
  exact = np.asarray(routing.route(x, p, cfg, bias, tier_mask=tm).expert_nk)
  k = cfg.k_active
  assert got.shape == (N, min(width * k, T * G * EG))
  np.testing.assert_array_equal(got[:, :k], exact)
  for n in range(N):
    want = [e for e in beam_ref(x[n], p, bias, score, width * k, tm) if e not in exact[n]][:width * k - k]
    extra = list(dict.fromkeys(got[n, k:].tolist()))
    assert [e for e in extra if e not in exact[n]] == want
    if mask is not None:
      assert all(mask[e // (G * EG)] for e in got[n])


def test_wider_prefetch_covers_more_of_a_perturbed_choice(router):
  """What the width is for: the router's choice on a nearby input is covered better by a wider set."""
  x, p, _ = router
  cfg = moe_cfg()
  noisy = x + 0.5 * np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  used = np.asarray(routing.route(noisy, p, cfg).expert_nk)
  recall = []
  for width in (1, 4, 16):
    got = np.asarray(candidates_jit(x, p, cfg, None, None, width))
    recall.append(np.mean([len(set(u) & set(g)) / len(set(u)) for u, g in zip(used.tolist(), got.tolist())]))
  assert recall[0] <= recall[1] <= recall[2] and recall[2] > recall[0]
