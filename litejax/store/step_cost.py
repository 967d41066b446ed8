"""The latency model of one decode step of the tiered runtime (litejax.tiered_decode), program by program.

The store decode does not run one fused step: per token it runs an embed, per layer one to four jitted
programs (dense layer; or moe_pre, experts per wave, finish, lookahead), the head and the sampler, and it
waits for the device once per MoE layer (the expert ids it routes on) and once more per lookahead and per
token. So its compute time is priced as

    sum over the programs run per token of latency.estimate_compiled(program).total_s
    + calls x call_overhead_s      (host dispatch of one jitted call: hardware.Chip.call_overhead_s where
                                    calibrate measured it, else `call_probe_s` here)
    + syncs x sync_s               (one device -> host round trip that the host waits on: `sync_probe_s`)

and the I/O term (litejax.tiersets.io_ms_per_step) is added by the caller. The programs are the ones a
real step runs: `record_step` decodes two tokens with the runtime's programs wrapped and keeps the
calls of the second forward (the first decode step), with their argument shapes.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

PROGRAMS = ('_embed', 'dense_layer', 'moe_pre', 'experts', 'finish', 'lookahead', '_head', '_sample')
SYNCING = ('moe_pre', 'lookahead', '_sample')   # outputs the host reads before it can go on


@dataclasses.dataclass
class Call:
  name: str
  fn: Callable
  args: tuple
  kwargs: dict


def _abstract(tree):
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a, tree)


def record_step(runtime, prompts: list[list[int]]) -> list[Call]:
  """The jitted calls of one decode step of `runtime` (a TieredRuntime) after a prefill of `prompts` (one
  per batch row), in order, with abstract arguments. Runs a real two-token decode (it reads and loads
  experts)."""
  from litejax import tiered_decode
  calls: list[Call] = []
  saved = {name: getattr(tiered_decode, name) for name in PROGRAMS}

  def wrap(name, fn):
    def rec(*args, **kwargs):
      calls.append(Call(name, fn, _abstract(args), _abstract(kwargs)))
      return fn(*args, **kwargs)
    rec._cache_size = getattr(fn, '_cache_size', None)   # read by TieredRuntime.generate
    return rec

  for name, fn in saved.items():
    setattr(tiered_decode, name, wrap(name, fn))
  try:
    runtime.generate(prompts, 2)
  finally:
    for name, fn in saved.items():
      setattr(tiered_decode, name, fn)
  starts = [i for i, c in enumerate(calls) if c.name == '_embed']
  return calls[starts[1]:] if len(starts) > 1 else calls


def _probe(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def call_probe_s(repeats: int = 200) -> float:
  """Median host time to dispatch one trivial jitted call (no wait for its result)."""
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: x + 1)
  x = jnp.zeros((8,), jnp.float32)
  jax.block_until_ready(f(x))

  def many():
    y = x
    for _ in range(16):
      y = f(y)
    jax.block_until_ready(y)
  return _probe(many, max(repeats // 16, 3)) / 16


def sync_probe_s(repeats: int = 100) -> float:
  """Median extra time of a device -> host read of a small result over the call alone."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  f = jax.jit(lambda x: x + 1)
  x = jnp.zeros((8,), jnp.int32)
  return max(_probe(lambda: np.asarray(f(x)), repeats) - call_probe_s(repeats), 0.0)


def price(calls: list[Call], chip, call_overhead_s: float | None = None, sync_s: float | None = None) -> dict:
  """The compute part of one decode step of the tiered runtime (module docstring), in ms, with its parts:
  per program the calls and the summed estimate."""
  from litejax import latency
  if call_overhead_s is None:
    call_overhead_s = getattr(chip, 'call_overhead_s', 0.0) or call_probe_s()
  sync_s = sync_probe_s() if sync_s is None else sync_s
  cache: dict[Any, float] = {}
  per: dict[str, dict[str, float]] = {}
  for c in calls:
    key = (c.name, repr(c.args), repr(c.kwargs))
    if key not in cache:
      compiled = c.fn.lower(*c.args, **c.kwargs).compile()
      cache[key] = latency.estimate_compiled(compiled, chip)['total_s']
    row = per.setdefault(c.name, {'calls': 0, 'programs_ms': 0.0})
    row['calls'] += 1
    row['programs_ms'] += 1e3 * cache[key]
  n_calls = len(calls)
  n_syncs = sum(1 for c in calls if c.name in SYNCING)
  programs_ms = sum(r['programs_ms'] for r in per.values())
  return {'programs_ms': programs_ms, 'calls': n_calls, 'call_overhead_ms': 1e3 * call_overhead_s,
          'syncs': n_syncs, 'sync_ms': 1e3 * sync_s,
          'compute_ms': programs_ms + n_calls * 1e3 * call_overhead_s + n_syncs * 1e3 * sync_s,
          'per_program': per}
