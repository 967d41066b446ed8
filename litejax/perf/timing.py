"""Wall-clock timing of jitted work, shared by `litejax calibrate` (litejax.perf.latency) and experiments/.

On a shared machine other work only ever adds time, so callers keep the fastest run (a machine's
capability) or the median (a typical step); warm-up calls absorb compilation and first-touch costs.
"""
from __future__ import annotations

import time
from typing import Callable


def time_calls(call: Callable[[], object], repeats: int, *, warmup: int = 1,
               budget_s: float | None = None) -> list[float]:
  """Seconds of each of `repeats` runs of `call()`, each waited for (jax.block_until_ready on what it
  returns), after `warmup` untimed runs. With budget_s, stops early once the timed runs have taken
  that long, but never before 3 runs (or `repeats`, if fewer)."""
  import jax
  if repeats < 1:
    raise ValueError(f'repeats must be >= 1, got {repeats}')
  for _ in range(warmup):
    jax.block_until_ready(call())
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats and (budget_s is None or len(times) < 3 or time.perf_counter() - start < budget_s):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return times


def best_time(fn, *args, repeats: int, warmup: int = 1) -> float:
  """Fastest of `repeats` timed calls of fn(*args) after warm-up."""
  return min(time_calls(lambda: fn(*args), repeats, warmup=warmup))
