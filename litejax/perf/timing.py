"""Wall-clock timing, litejax's one set of timing primitives: `litejax calibrate` (its host probes and
steps), the tiered runtime's latency model (litejax.inference.step_latency) and experiments/ time with them.

On a shared machine other work only ever adds time, so callers keep the fastest run (a machine's
capability) or the median (a typical step); warm-up calls absorb compilation and first-touch costs.
Each call's result is waited for (jax.block_until_ready, which passes NumPy and None through), so a
jitted call is timed to its end, not to its dispatch.
"""
from __future__ import annotations

import dataclasses
import statistics
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


def per_call_s(call: Callable[[], object], repeats: int, *, warmup: int = 1) -> float:
  """Seconds per call of `repeats` back-to-back runs of `call()` waited for once at the end: what
  dispatching costs the host when nothing waits between calls (time_calls waits after each)."""
  import jax
  if repeats < 1:
    raise ValueError(f'repeats must be >= 1, got {repeats}')
  for _ in range(warmup):
    jax.block_until_ready(call())
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


@dataclasses.dataclass
class Timed:
  """One thing timed each round of `median_interleaved`: `call()` runs it once (the result is waited for)."""
  name: str
  call: Callable[[], object]
  calls_per_round: int = 1


def median_interleaved(timed: list[Timed], rounds: int,
                       between: Callable[[], object] | None = None) -> dict[str, float]:
  """Median seconds of each `call` over `rounds` rounds, each round timing every one in turn
  (`calls_per_round` runs each), then running `between()` (the caller's own measurement, taken under
  the same load). A first untimed run of each keeps compile-time and first-touch costs out."""
  import jax
  for t in timed:
    jax.block_until_ready(t.call())
  runs: dict[str, list[float]] = {t.name: [] for t in timed}
  for _ in range(rounds):
    for t in timed:
      runs[t.name] += time_calls(t.call, t.calls_per_round, warmup=0)
    if between is not None:
      between()
  return {name: statistics.median(ts) for name, ts in runs.items()}
