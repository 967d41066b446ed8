"""JAX's private APIs, behind one small wrapper: the only module of litejax that may reach into `jax._src`
or a jitted function's private attributes (tests/test_layering.py checks it), so that a JAX upgrade that
moves them breaks here. Each function says what it needs and why no public API gives it."""
from __future__ import annotations


def backends_initialized() -> bool:
  """Whether JAX has started its backends (after that, `jax_platforms` no longer takes effect). JAX has
  no public query for it (jax._src.xla_bridge.backends_are_initialized)."""
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def prefer_cpu_backend() -> None:
  """Makes CPU JAX's default platform when nothing chose one and no backend has started: with libtpu
  installed and no TPU attached, the first jax.devices() would otherwise try (and fail) to open a TPU,
  printing libtpu's probe warnings. Compile-only TPU devices (jax.experimental.topologies) are unaffected."""
  import jax
  if jax.config.jax_platforms is None and not backends_initialized():
    jax.config.update('jax_platforms', 'cpu')


def compiled_variants(jitted) -> int:
  """How many variants (argument shapes, dtypes, shardings, static values) the jitted function `jitted`
  has compiled so far in this process. Reads the private `_cache_size()` of a `jax.jit` wrapper (no public
  API counts compilations); its cache is per wrapped function object, shared by every `jax.jit` of the
  same function."""
  return int(jitted._cache_size())
