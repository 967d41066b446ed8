"""The JAX private APIs litejax relies on, in one place, so that a JAX upgrade that moves them breaks here.

Each function names what it reads and degrades where JAX allows it. Nothing else in litejax (or its tests
and experiments) touches `jax._src` or a jitted function's private attributes (tests/test_layering.py).
"""
from __future__ import annotations


def compiled_variants(jitted) -> int:
  """How many variants (argument shapes, dtypes, shardings, static values) the jitted function `jitted`
  has compiled so far in this process. Reads the private `_cache_size()` of a `jax.jit` wrapper; its
  cache is per wrapped function object, shared by every `jax.jit` of the same function."""
  return int(jitted._cache_size())
