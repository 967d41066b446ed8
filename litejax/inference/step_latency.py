"""The latency model of one decode step of the store runtime (litejax.inference.store_decode), program by program.

The store decode does not run one fused step: per token it runs an embed, per layer one to four jitted
programs (dense layer; or moe_pre, experts per wave, finish, lookahead; pre-gated: moe_attend or moe_pre,
pregate, experts, finish), the head and the sampler, and it waits for the device once per MoE layer (the
expert ids it routes on; pre-gated, the ids of the layer D ahead, read once this layer's experts are
queued) and once more per lookahead and per token. Those waits serialise host and device: while the host looks up levels and dispatches, the device
has nothing queued, and while the device runs, the host waits. So a step costs

    sum over the programs run per token of latency.estimate_compiled(program).total_s    (device)
    + sum over those calls of a host dispatch overhead: hardware.Chip.call_overhead_s where `litejax
      calibrate` measured it, else `dispatch_probe_s` (a do-nothing program with the call's arguments)
    + the host work outside the calls (level lookups, the runtime's bookkeeping), measured on real
      steps by `record_step`

and the I/O term (litejax.inference.tiersets.io_ms_per_step) is added by the caller. The programs are the ones a
real step runs: `record_step` decodes a few tokens through the runtime's hooks (a `Recorder`) and keeps
the calls of the last forward, with their argument shapes.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

from litejax.perf import timing

SYNCING = ('moe_pre', 'lookahead', 'pregate', '_sample')   # outputs the host reads before it can go on


@dataclasses.dataclass
class Call:
  name: str
  fn: Callable
  args: tuple
  kwargs: dict
  static_argnums: tuple[int, ...] = ()
  dispatch_s: float = 0.0     # host time inside the call (jitted calls return before the device is done)
  t_start: float = 0.0
  t_end: float = 0.0


def _abstract(tree):
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a, tree)


@dataclasses.dataclass
class Recording:
  calls: list[Call]     # the jitted calls of one decode step, in order
  host_s: float         # the step's host work outside jitted calls: wall less calls, waits and recording


class Recorder:
  """Store-runtime hooks (litejax.inference.store_programs.Hooks) that run every program call and host wait
  and record each: the calls with abstract arguments and their host time, the waits' start and length."""

  def __init__(self):
    self.calls: list[Call] = []
    self.waits: list[tuple[float, float]] = []   # (start, seconds) of each wait for a device result

  def call(self, program, *args, **kwargs):
    t = time.perf_counter()
    call = Call(program.name, program.fn, _abstract(args), _abstract(kwargs), program.static_argnums, t_start=t)
    t0 = time.perf_counter()
    out = program.fn(*args, **kwargs)
    call.t_end = time.perf_counter()
    call.dispatch_s = call.t_end - t0
    self.calls.append(call)
    return out

  def device_get(self, tree):
    import jax
    t0 = time.perf_counter()
    out = jax.device_get(tree)
    self.waits.append((t0, time.perf_counter() - t0))
    return out


def record_step(runtime, prompts: list[list[int]], steps: int = 5) -> Recording:
  """The jitted calls of one decode step of `runtime` (a store runtime) after a prefill of `prompts` (one
  per batch row), in order, with abstract arguments and the host time each call took, and the step's
  host work outside the calls (the level lookups and the runtime's bookkeeping: the wall time less the
  calls, the waits for device results and the recording's own work; the median over `steps` steps).
  Runs a real decode of steps + 2 tokens through a Recorder and keeps the last step's calls (the first
  step compiles). Pass a runtime whose step does no I/O (e.g. hot tiers' experts preloaded), or its I/O is counted
  as host time."""
  rec = Recorder()
  runtime.generate(prompts, steps + 2, hooks=rec)
  calls, waits = rec.calls, rec.waits
  firsts = [i for i, c in enumerate(calls) if c.name == '_embed'][-steps:]
  host = []
  for a, b in zip(firsts, firsts[1:] + [len(calls)]):
    start, end = calls[a].t_start, calls[b - 1].t_end
    inside = sum(c.t_end - c.t_start for c in calls[a:b])    # recording work of the call included
    waited = sum(d for t, d in waits if start <= t < end)
    host.append(max(end - start - inside - waited, 0.0))
  return Recording(calls[firsts[-1]:], statistics.median(host))


def dispatch_probe_s(call: Call, repeats: int = 20) -> float:
  """Host time to dispatch a jitted call with `call`'s arguments (same pytrees, shapes, static values)
  whose program does nothing: the per-call overhead of that call, without its execution (XLA:CPU may run
  a small program inline in the dispatching thread, so the recorded call times include execution)."""
  import jax
  import jax.numpy as jnp
  noop = jax.jit(lambda *a, **k: jnp.zeros((), jnp.int32), static_argnums=call.static_argnums)
  concrete = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a,
                          (call.args, call.kwargs))
  return timing.per_call_s(lambda: noop(*concrete[0], **concrete[1]), repeats)


def price(rec: Recording, chip, call_overhead_s: float | None = None) -> dict:
  """The compute part of one decode step of the store runtime (module docstring), in ms, with its parts:
  per program the calls, the summed estimate and dispatch. Dispatch per call: `call_overhead_s` when
  given, else the chip's `call_overhead_s` (litejax calibrate), else `dispatch_probe_s` of that call."""
  from litejax.perf import latency
  per_call = call_overhead_s if call_overhead_s is not None else getattr(chip, 'call_overhead_s', 0.0)
  cache: dict[Any, tuple[float, float]] = {}
  per: dict[str, dict[str, float]] = {}
  for c in rec.calls:
    key = (c.name, repr(c.args), repr(c.kwargs))
    if key not in cache:
      compiled = c.fn.lower(*c.args, **c.kwargs).compile()
      cache[key] = (latency.estimate_compiled(compiled, chip)['total_s'], per_call or dispatch_probe_s(c))
    row = per.setdefault(c.name, {'calls': 0, 'programs_ms': 0.0, 'dispatch_ms': 0.0})
    row['calls'] += 1
    row['programs_ms'] += 1e3 * cache[key][0]
    row['dispatch_ms'] += 1e3 * cache[key][1]
  programs_ms = sum(r['programs_ms'] for r in per.values())
  dispatch_ms = sum(r['dispatch_ms'] for r in per.values())
  return {'programs_ms': programs_ms, 'dispatch_ms': dispatch_ms, 'host_ms': 1e3 * rec.host_s,
          'calls': len(rec.calls), 'syncs': sum(1 for c in rec.calls if c.name in SYNCING),
          'dispatch_source': 'given' if call_overhead_s is not None else
          ('chip.call_overhead_s' if per_call else 'dispatch_probe_s per call'),
          'recorded_call_ms': 1e3 * sum(c.dispatch_s for c in rec.calls),
          'compute_ms': programs_ms + dispatch_ms + 1e3 * rec.host_s, 'per_program': per}
