"""Sampling filters (litejax.inference.sampling) against hand-worked cases and a NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np

from litejax.inference.sampling import Sampling, filter_logits, sample


def np_filter(logits, k, p):
  """Reference: keep the top k (0 = all), then the smallest best-first prefix with probability >= p."""
  order = np.argsort(-logits, kind='stable')
  keep = order[:k] if k else order
  probs = np.exp(logits[keep] - logits[keep].max())
  probs /= probs.sum()
  n = int(np.searchsorted(np.cumsum(probs), p - 1e-7) + 1)
  out = np.full_like(logits, -np.inf)
  out[keep[:n]] = logits[keep[:n]]
  return out


def test_filters_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.1, 0.3, 0.1]]))
  kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))[0].tolist()  # noqa: E731
  assert kept(0, 1.0) == [True] * 4
  assert kept(2, 1.0) == [True, False, True, False]
  assert kept(0, 0.5) == [True, False, False, False]      # 0.5 alone reaches 0.5
  assert kept(0, 0.6) == [True, False, True, False]
  assert kept(1, 0.9) == [True, False, False, False]


def test_filters_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 40)).astype(np.float32) * 3
  for k, p in [(0, 0.9), (5, 1.0), (7, 0.5), (40, 0.3), (1, 1.0)]:
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(k), jnp.float32(p)))
    for row, want in zip(got, [np_filter(r, k, p) for r in logits]):
      np.testing.assert_array_equal(np.isfinite(row), np.isfinite(want))


def test_greedy_at_zero_temperature_and_samples_stay_in_the_filter():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 30)), jnp.float32)
  greedy = sample(logits, jax.random.key(0), Sampling().as_arrays())
  np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), -1))
  s = Sampling(temperature=2.0, top_k=3).as_arrays()
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  for seed in range(20):
    tok = np.asarray(sample(logits, jax.random.key(seed), s))
    assert all(t in row for t, row in zip(tok, top3))
