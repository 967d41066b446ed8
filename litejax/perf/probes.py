"""The host probes of `litejax calibrate` (litejax.calibrate.calibration): small jitted programs whose work is
known, timed interleaved (litejax.perf.timing.median_interleaved), from which this CPU's latency-model chip
is derived (litejax.perf.host).

  peak FLOP/s        a chain of [n, n] @ [n, n] products (n = 512: operands in cache, as the models' dots)
  memory bandwidth   x*a+b in place over a large f32 array (donated: no page faults timed)
  transpose bw       a [batch, seq, heads, head_dim] -> [batch, heads, head_dim, seq] rotation
  gather bw          each of 16 rows gathers 4 [128, 32] rows of a [256, 128, 32] table, laid out
                     [rows, 128, 4, 32]: a decode step's per-token gather of its K experts' weights
  sort comparison    a sort of [16, 1024] rows (the sampler sorts the vocabulary): seconds / n·log2(n)
  call overhead      the host calls of one decode-loop step (litejax.inference.decode.generate) around a program
                     with no work; (time - the program's kernels as priced) / CALL_PROBE_CALLS
  kernel overhead    two chains of small kernels (a dot, a softmax, a scan, a sort, a gather per step),
                     short and long: (extra time - the extra work priced by the model) / extra kernels
"""
from __future__ import annotations

from litejax.perf import chips as hardware, latency
from litejax.perf.timing import Timed

# Short steps are timed this many times per round (their fastest run needs more tries).
SHORT_STEP_CALLS = 4


def peak_probe(n: int, steps: int = 8) -> tuple[Timed, float]:
  """(the matmul chain, its FLOPs)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32) / n

  @jax.jit
  def chain(x):
    for _ in range(steps):   # several products per call, so dispatch overhead is amortised
      x = x @ a
    return x

  return Timed('peak', lambda: chain(a), SHORT_STEP_CALLS), steps * 2.0 * n ** 3


def bandwidth_probe(mbytes: int, calls: int = 4) -> tuple[Timed, float]:
  """(in-place x*a+b over `mbytes` MiB, `calls` times per timing; its bytes read + written)."""
  import jax
  import jax.numpy as jnp
  n = mbytes * 2 ** 20 // 4
  f = jax.jit(lambda x: x * 1.0001 + 1e-3, donate_argnums=0)
  x = jnp.ones((n,), jnp.float32)

  def run():
    nonlocal x
    for _ in range(calls):   # several calls per timing, so dispatch overhead is amortised
      x = f(x)
    return x

  return Timed('bandwidth', run), 2.0 * n * 4 * calls


def transpose_probe(shape: tuple[int, ...]) -> tuple[Timed, float]:
  """(one head rotation fused with a scale, as XLA fuses it; its bytes read + written). One kernel
  per call: XLA composes a chain of transposes into one."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones(shape, jnp.float32)
  f = jax.jit(lambda x: jnp.transpose(x * 1.0001, (0, 2, 3, 1)))
  return Timed('transpose', lambda: f(x), SHORT_STEP_CALLS), 2.0 * x.size * 4


def _overhead_block(x_rd, w_dd):
  """One step of the overhead chains: kernels of the kinds a model step runs, on a few rows."""
  import jax
  import jax.numpy as jnp
  x_rd = jax.nn.softmax(jnp.tanh(x_rd @ w_dd), axis=-1)
  x_rd = jnp.cumsum(x_rd, axis=-1)
  idx_rk = jnp.argsort(x_rd[:, :8], axis=-1)
  return x_rd + jnp.take_along_axis(x_rd, idx_rk, axis=-1).sum(-1, keepdims=True) * 1e-3


def overhead_probes(chains: tuple[int, int] = (8, 40), rows: int = 8) -> list[tuple[Timed, object]]:
  """[(timed chain, its compiled program)] for a short and a long chain of `_overhead_block`s."""
  import jax
  import jax.numpy as jnp
  x, w = jnp.ones((rows, 64), jnp.float32), jnp.eye(64, dtype=jnp.float32)
  out = []
  for n in chains:
    def chain(x_rd, w_dd, n=n):
      for _ in range(n):
        x_rd = _overhead_block(x_rd, w_dd)
      return x_rd
    compiled = jax.jit(chain).lower(x, w).compile()
    out.append((Timed(f'overhead-{n}', lambda c=compiled: c(x, w), SHORT_STEP_CALLS), compiled))
  return out


def gather_probe(rows: int = 16, k: int = 4, table: tuple[int, int, int] = (256, 128, 32)) -> tuple[Timed, float]:
  """(the decode step's expert-row gather, its bytes read + written)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  w_edh = jnp.ones(table, jnp.float32)
  idx_nk = jnp.asarray(np.random.default_rng(0).integers(0, table[0], (rows, k)), jnp.int32)
  f = jax.jit(lambda w, i: jnp.transpose(w[i], (0, 2, 1, 3)))   # [n, k, d, h] -> [n, d, k, h]
  return Timed('gather', lambda: f(w_edh, idx_nk), SHORT_STEP_CALLS), 2.0 * rows * k * table[1] * table[2] * 4


def sort_probe(shape: tuple[int, int] = (16, 1024)) -> tuple[Timed, float]:
  """(a sort of `shape`'s rows, its comparisons as latency.sort_comparisons counts them)."""
  import math

  import jax
  import jax.numpy as jnp
  import numpy as np
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  f = jax.jit(lambda x: jnp.sort(x, axis=-1))
  return Timed('sort', lambda: f(x), SHORT_STEP_CALLS), shape[0] * shape[1] * math.log2(shape[1])


# Argument arrays of the call probe's jitted program: about as many as a small model's decode step
# (tiny's: parameters, router state and a 4-layer KV cache). Dispatch flattens each one.
CALL_PROBE_LEAVES = 64
# Host calls the call probe makes per run: the decode loop's per-step calls, one each
# (litejax.inference.decode.HOST_CALLS_PER_STEP; tests/test_latency.py checks the two agree).
CALL_PROBE_CALLS = 4


def call_probe(leaves: int = CALL_PROBE_LEAVES, rows: int = 1) -> tuple[Timed, object]:
  """(one decode-loop step's host calls around a program with no work, that program compiled).
  The calls are decode.generate's, one each (CALL_PROBE_CALLS of them): put the int32 rows with the
  batch sharding, put a NumPy scalar replicated, dispatch the jitted program (every argument kept, the
  state donated, as the decode step's cache), fetch its output to the host."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  row_sh, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  params = [jax.device_put(jnp.full((4,), i, jnp.float32), rep) for i in range(leaves - 8)]
  state = [jax.device_put(jnp.zeros((4,), jnp.float32), rep) for _ in range(8)]

  def program(params, state, rows_b, index):
    return rows_b + index, state

  jitted = jax.jit(program, in_shardings=(rep, rep, row_sh, rep), out_shardings=(row_sh, rep),
                   donate_argnums=(1,), keep_unused=True)
  host_rows = np.zeros((rows,), np.int32)
  compiled = jitted.lower(params, state, jax.device_put(host_rows, row_sh),
                          jax.device_put(np.int32(0), rep)).compile()

  box = {'state': state}   # the donated state of the previous call feeds the next

  def run():
    out, box['state'] = jitted(params, box['state'], jax.device_put(host_rows + 1, row_sh),
                               jax.device_put(np.int32(1), rep))
    return np.asarray(jax.device_get(out))

  return Timed('call', run, SHORT_STEP_CALLS), compiled


def call_overhead(compiled, seconds: float, chip: hardware.Chip) -> float:
  """Host seconds per call from the call probe's seconds per run: less its program's kernels and
  work as `chip` prices them, over the calls it makes (CALL_PROBE_CALLS)."""
  return max(seconds - latency.estimate_compiled(compiled, chip)['total_s'], 0.0) / CALL_PROBE_CALLS


def kernel_overhead(points: list[tuple[object, float]], chip: hardware.Chip) -> float:
  """Seconds per kernel from two (compiled chain, measured seconds) points: the extra time of the
  longer chain less its extra work as `chip` prices it (without overhead), over its extra kernels.
  The fixed cost of a call cancels; the work the kernels do is not counted twice."""
  (c1, t1), (c2, t2) = points
  e1, e2 = latency.estimate_compiled(c1, chip), latency.estimate_compiled(c2, chip)
  work1, work2 = e1['total_s'] - e1['overhead_s'], e2['total_s'] - e2['overhead_s']
  if e2['kernels'] <= e1['kernels']:
    raise ValueError(f"the long overhead chain runs {e2['kernels']} kernels, the short one {e1['kernels']}")
  return max((t2 - work2) - (t1 - work1), 0.0) / (e2['kernels'] - e1['kernels'])
