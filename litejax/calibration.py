"""`litejax calibrate`: the latency model (litejax.latency) checked against timed steps on this CPU.

The host chip is measured by probes, each a small jitted program whose work is known:
  peak FLOP/s        a chain of [n, n] @ [n, n] products (n = 512: operands in cache, as the models' dots)
  memory bandwidth   x*a+b in place over a large f32 array (donated: no page faults timed)
  transpose bw       a [batch, seq, heads, head_dim] -> [batch, heads, head_dim, seq] rotation
  kernel overhead    two chains of small kernels (a dot, a softmax, a scan, a sort, a gather per step),
                     short and long: (extra time - the extra work priced by the model) / extra kernels
  gather bw          each of 16 rows gathers 4 [128, 32] rows of a [256, 128, 32] table, laid out
                     [rows, 128, 4, 32]: a decode step's per-token gather of its K experts' weights
  sort comparison    a sort of [16, 1024] rows (the sampler sorts the vocabulary): seconds / n·log2(n)
  call overhead      the host calls of one decode-loop step (litejax.decode.generate) around a program
                     with no work: a batch-sharded row put, a replicated scalar put, a jitted call with a
                     model's worth of argument arrays and a donated state, the result fetched to the host;
                     (time - the program's kernels as priced) / decode.HOST_CALLS_PER_STEP
Then several configs/tiny.yaml variants are compiled (forward, one device, layers unrolled), their
step time predicted by latency.estimate_compiled on the measured host chip, and timed.

Timing is interleaved: every round times each probe and each step once, and each keeps its median
over the rounds. On a machine shared with other work the host's figures and the step times are then
taken under the same conditions, not minutes apart; the median, not the fastest run, because a short
probe's fastest run slips into a moment the other work left both cores free, which a long step's
never does (the fastest runs made the host look faster than the long steps it predicted).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

from litejax import hardware, latency
from litejax.timing import time_calls

# The configs timed by `calibrate`: configs/tiny.yaml with these overrides (batch from --batch),
# chosen to span compute-bound (wide) to memory- and layout-heavy (long sequences) forward passes.
CALIBRATION_CONFIGS = {
    'tiny': [],
    'tiny-d256': ['model.d_model=256', 'moe.d_expert=256', 'model.d_ff=512'],
    'tiny-d512': ['model.d_model=512', 'moe.d_expert=512', 'model.d_ff=1024', 'model.num_heads=8',
                  'model.num_kv_heads=4'],
    'tiny-L8-s256': ['model.num_layers=8', 'model.seq_len=256'],
}
QUICK_CONFIGS = {   # with DECODE_PROXIES' batch-1 row: two compiles, a smoke test
    'tiny-s32': ['model.seq_len=32', 'model.num_layers=1'],
}
# Decode-like rows, with their own batch: tiny's forward over ONE token at batch 1 and 16. A proxy
# for the decode step (issue 12's bench_decode): the decode step function is not on this branch, so
# the attention here is over the one token, not over a KV cache; the weights read, the routing and
# the kernels launched per token are the decode step's.
DECODE_PROXIES = {
    'token-b1': (['model.seq_len=1'], 1),
    'token-b16': (['model.seq_len=1'], 16),
}
# Short steps are timed this many times per round (their fastest run needs more tries).
_SHORT_STEP_CALLS = 4


@dataclasses.dataclass
class _Timed:
  """One thing timed each round: `call()` runs it once (the result is waited for)."""
  name: str
  call: Callable[[], object]
  calls_per_round: int = 1


def _median_interleaved(timed: list[_Timed], rounds: int,
                        between: Callable[[], object] | None = None) -> dict[str, float]:
  """Median seconds of each `call` over `rounds` rounds, each round timing every one in turn, then
  running `between()` (the caller's own measurement, taken under the same load)."""
  import jax
  for t in timed:                           # compile-time and first-touch costs stay out
    jax.block_until_ready(t.call())
  runs: dict[str, list[float]] = {t.name: [] for t in timed}
  for _ in range(rounds):
    for t in timed:
      runs[t.name] += time_calls(t.call, t.calls_per_round, warmup=0)
    if between is not None:
      between()
  return {name: statistics.median(ts) for name, ts in runs.items()}


def _peak_probe(n: int, steps: int = 8) -> tuple[_Timed, float]:
  """(the matmul chain, its FLOPs)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32) / n

  @jax.jit
  def chain(x):
    for _ in range(steps):   # several products per call, so dispatch overhead is amortised
      x = x @ a
    return x

  return _Timed('peak', lambda: chain(a), _SHORT_STEP_CALLS), steps * 2.0 * n ** 3


def _bandwidth_probe(mbytes: int, calls: int = 4) -> tuple[_Timed, float]:
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

  return _Timed('bandwidth', run), 2.0 * n * 4 * calls


def _transpose_probe(shape: tuple[int, ...]) -> tuple[_Timed, float]:
  """(one head rotation fused with a scale, as XLA fuses it; its bytes read + written). One kernel
  per call: XLA composes a chain of transposes into one."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones(shape, jnp.float32)
  f = jax.jit(lambda x: jnp.transpose(x * 1.0001, (0, 2, 3, 1)))
  return _Timed('transpose', lambda: f(x), _SHORT_STEP_CALLS), 2.0 * x.size * 4


def _overhead_block(x_rd, w_dd):
  """One step of the overhead chains: kernels of the kinds a model step runs, on a few rows."""
  import jax
  import jax.numpy as jnp
  x_rd = jax.nn.softmax(jnp.tanh(x_rd @ w_dd), axis=-1)
  x_rd = jnp.cumsum(x_rd, axis=-1)
  idx_rk = jnp.argsort(x_rd[:, :8], axis=-1)
  return x_rd + jnp.take_along_axis(x_rd, idx_rk, axis=-1).sum(-1, keepdims=True) * 1e-3


def _overhead_probes(chains: tuple[int, int] = (8, 40), rows: int = 8) -> list[tuple[_Timed, object]]:
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
    out.append((_Timed(f'overhead-{n}', lambda c=compiled: c(x, w), _SHORT_STEP_CALLS), compiled))
  return out


def _gather_probe(rows: int = 16, k: int = 4, table: tuple[int, int, int] = (256, 128, 32)) -> tuple[_Timed, float]:
  """(the decode step's expert-row gather, its bytes read + written)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  w_edh = jnp.ones(table, jnp.float32)
  idx_nk = jnp.asarray(np.random.default_rng(0).integers(0, table[0], (rows, k)), jnp.int32)
  f = jax.jit(lambda w, i: jnp.transpose(w[i], (0, 2, 1, 3)))   # [n, k, d, h] -> [n, d, k, h]
  return _Timed('gather', lambda: f(w_edh, idx_nk), _SHORT_STEP_CALLS), 2.0 * rows * k * table[1] * table[2] * 4


def _sort_probe(shape: tuple[int, int] = (16, 1024)) -> tuple[_Timed, float]:
  """(a sort of `shape`'s rows, its comparisons as latency.sort_comparisons counts them)."""
  import math

  import jax
  import jax.numpy as jnp
  import numpy as np
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  f = jax.jit(lambda x: jnp.sort(x, axis=-1))
  return _Timed('sort', lambda: f(x), _SHORT_STEP_CALLS), shape[0] * shape[1] * math.log2(shape[1])


# Argument arrays of the call probe's jitted program: about as many as a small model's decode step
# (tiny's: parameters, router state and a 4-layer KV cache). Dispatch flattens each one.
_CALL_PROBE_LEAVES = 64


def _call_probe(leaves: int = _CALL_PROBE_LEAVES, rows: int = 1) -> tuple[_Timed, object]:
  """(one decode-loop step's host calls around a program with no work, that program compiled).
  The calls are decode.generate's, one each (decode.HOST_CALLS_PER_STEP): put the int32 rows with the
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

  return _Timed('call', run, _SHORT_STEP_CALLS), compiled


def call_overhead(compiled, seconds: float, chip: hardware.Chip) -> float:
  """Host seconds per call from the call probe's seconds per run: less its program's kernels and
  work as `chip` prices them, over the calls it makes (litejax.decode.HOST_CALLS_PER_STEP)."""
  from litejax.decode import HOST_CALLS_PER_STEP
  return max(seconds - latency.estimate_compiled(compiled, chip)['total_s'], 0.0) / HOST_CALLS_PER_STEP


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


def _config_step(cfg, batch: int):
  """(compiled forward, a call of it) of one config on one CPU device."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from litejax.model import init_model
  graphdef, state = nnx.split(init_model(cfg, seed=0))

  def forward(state, tokens_bs):
    return nnx.merge(graphdef, state)(tokens_bs)[0]

  tokens = jnp.zeros((batch, cfg.model.seq_len), jnp.int32)
  compiled = jax.jit(forward).lower(state, tokens).compile()
  return compiled, lambda: compiled(state, tokens)


def _ranks_agree(pred: list[float], meas: list[float]) -> bool:
  """Whether the prediction orders the configs as the measurement does."""
  return sorted(range(len(pred)), key=pred.__getitem__) == sorted(range(len(meas)), key=meas.__getitem__)


def _host_probes(quick: bool):
  """(the probes to time, a function of their median seconds -> the host Chip)."""
  peak_t, flops = _peak_probe(256 if quick else 512)
  bw_t, bw_bytes = _bandwidth_probe(16 if quick else 256)
  tr_t, tr_bytes = _transpose_probe((8, 64, 4, 32) if quick else (32, 256, 4, 32))
  chains = _overhead_probes((2, 6) if quick else (8, 40))
  call_t, call_prog = _call_probe()
  gather_t, gather_b = _gather_probe()
  sort_t, sort_n = _sort_probe()

  def host(seconds: dict[str, float]) -> hardware.Chip:
    peak, bw, t_bw = flops / seconds['peak'], bw_bytes / seconds['bandwidth'], tr_bytes / seconds['transpose']
    g_bw, sort_s = gather_b / seconds['gather'], seconds['sort'] / sort_n
    kernel_s = kernel_overhead([(c, seconds[t.name]) for t, c in chains],
                               hardware.host_chip(peak, bw, transpose_bytes_per_s=t_bw, gather_bytes_per_s=g_bw,
                                                  sort_comparison_s=sort_s))
    chip = hardware.host_chip(peak, bw, kernel_overhead_s=kernel_s, transpose_bytes_per_s=t_bw,
                              gather_bytes_per_s=g_bw, sort_comparison_s=sort_s)
    call_s = call_overhead(call_prog, seconds['call'], chip)
    return dataclasses.replace(chip, call_overhead_s=call_s)

  return [peak_t, bw_t, tr_t, call_t, gather_t, sort_t] + [t for t, _ in chains], host


def measure_host(repeats: int = 5, quick: bool = False,
                 between: Callable[[], object] | None = None) -> hardware.Chip:
  """This CPU as a hardware.Chip (peak, bandwidths, per-kernel and per-call overheads), from the
  probes alone: what a caller that predicts a step on this machine (a decode benchmark) passes to
  latency.estimate_compiled. `between()`, when given, runs after each round of probes: a caller times
  its own step there, so that on a shared machine host and step are measured under the same load."""
  probes, host = _host_probes(quick)
  return host(_median_interleaved(probes, repeats, between))


def calibrate(configs: dict[str, list[str]] | None = None, *, base: str | None = None, batch: int = 8,
              repeats: int = 5, quick: bool = False, decode: dict[str, tuple[list[str], int]] | None = None) -> dict:
  """Measure this CPU, predict each config's forward step time with the model, time it, compare.

  `configs` run at `batch`; `decode` rows (default DECODE_PROXIES; in quick mode the batch-1 one)
  carry their own batch. `repeats` rounds of interleaved timing (module docstring). Returns the
  host chip facts, one row per config (flops, bytes, kernels, predicted terms, measured seconds,
  ratio), whether the model ranks the rows right, whether every ratio lies in latency.TRUST_BAND,
  and their geometric mean.
  """
  from litejax.config import load_config
  base = base or 'tiny'   # the shipped config (litejax.config.resolve_config_path)
  if configs is None:
    configs = QUICK_CONFIGS if quick else CALIBRATION_CONFIGS
  if decode is None:
    decode = dict(list(DECODE_PROXIES.items())[:1]) if quick else DECODE_PROXIES
  if quick:
    repeats, batch = min(repeats, 2), min(batch, 2)
  plan = [(n, o, batch, 1) for n, o in configs.items()]
  plan += [(n, o, b, _SHORT_STEP_CALLS) for n, (o, b) in decode.items()]
  steps, timed = {}, []
  for name, overrides, b, calls in plan:
    cfg = load_config(base, list(overrides) + ['model.scan_layers=false', 'mesh.data=1'])
    compiled, call = _config_step(cfg, b)
    steps[name] = (compiled, b, list(overrides))
    timed.append(_Timed(name, call, calls))
  probes, measured_host = _host_probes(quick)
  best = _median_interleaved(probes + timed, repeats)
  host = measured_host(best)
  rows = []
  for name, (compiled, b, overrides) in steps.items():
    est = latency.estimate_compiled(compiled, host, host_calls=1)   # each timing: one jitted call
    rows.append({'name': name, 'overrides': overrides, 'batch': b, **est, 'measured_s': best[name],
                 'predicted_over_measured': est['total_s'] / best[name]})
  ratios = [r['predicted_over_measured'] for r in rows]
  lo, hi = latency.TRUST_BAND
  return {
      'host': {'peak_flops': host.peak_flops, 'mem_bytes_per_s': host.hbm_bytes_per_s,
               'transpose_bytes_per_s': host.transpose_bytes_per_s, 'kernel_overhead_s': host.kernel_overhead_s,
               'call_overhead_s': host.call_overhead_s, 'gather_bytes_per_s': host.gather_bytes_per_s,
               'sort_comparison_s': host.sort_comparison_s},
      'batch': batch, 'repeats': repeats, 'rows': rows,
      'ranks_correctly': _ranks_agree([r['total_s'] for r in rows], [r['measured_s'] for r in rows]),
      'within_band': all(lo <= r <= hi for r in ratios), 'band': [lo, hi],
      'within_2x': all(0.5 <= r <= 2.0 for r in ratios),
      'geomean_ratio': statistics.geometric_mean(ratios) if ratios else None,
  }


def format_calibration(rep: dict, h) -> list[str]:
  """The calibration report as lines of text: the host, one line per row, the verdicts."""
  s, host = latency.seconds, rep['host']
  lines = [f"host: matmul peak {h(host['peak_flops'])}FLOP/s (f32), memory bandwidth "
           f"{h(host['mem_bytes_per_s'])}B/s ({h(host['transpose_bytes_per_s'])}B/s transposing), "
           f"{s(host['kernel_overhead_s'])} per kernel, {s(host['call_overhead_s'])} per host call   "
           f"(forward, median of {rep['repeats']} interleaved rounds)",
           f"{'config':14s} {'batch':>5s} {'FLOPs':>8s} {'bytes':>8s} {'kernels':>7s} {'compute':>9s} "
           f"{'memory':>9s} {'overhead':>9s} {'host':>9s} {'predicted':>10s} {'measured':>9s} {'pred/meas':>9s}  dominant"]
  for r in rep['rows']:
    lines.append(f"{r['name']:14s} {r['batch']:5d} {h(r['flops']):>8s} {h(r['bytes_accessed']):>8s} "
                 f"{r['kernels']:7.0f} {s(r['compute_s']):>9s} {s(r['memory_s']):>9s} {s(r['overhead_s']):>9s} "
                 f"{s(r['host_s']):>9s} {s(r['total_s']):>10s} {s(r['measured_s']):>9s} {r['predicted_over_measured']:9.2f}  "
                 f"{r['dominant']}")
  lo, hi = rep['band']
  lines.append(f"ranks configs correctly: {'yes' if rep['ranks_correctly'] else 'NO'};  within [{lo}, {hi}] of "
               f"measured: {'yes' if rep['within_band'] else 'NO'};  geometric-mean predicted/measured "
               f"{rep['geomean_ratio']:.2f}")
  return lines


# ---------------------------------------------------------------------------- tier read bandwidth

def _host_copy_bytes_per_s(mbytes: int, repeats: int) -> float:
  """Host-memory copy bandwidth (bytes copied per second, median of `repeats`): what moving an expert
  from the host cache into a device slot costs on a CPU backend, where both are host memory."""
  import time

  import numpy as np
  src = np.ones(mbytes * 2 ** 20, np.uint8)
  dst = np.empty_like(src)
  np.copyto(dst, src)   # first touch of dst's pages stays out
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    runs.append(time.perf_counter() - t0)
  return src.nbytes / statistics.median(runs)


def _read_uncached(path: str, nbytes: int) -> tuple[float, str]:
  """(seconds to read the file once, how the page cache was kept out): O_DIRECT into a page-aligned
  buffer where the filesystem allows it, else posix_fadvise(DONTNEED) before a plain read, else a
  plain read (the file is then likely still in the page cache: an upper bound on disk bandwidth)."""
  import mmap
  import os
  import time
  if hasattr(os, 'O_DIRECT'):
    try:
      fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
      fd = None
    if fd is not None:
      try:
        buf = mmap.mmap(-1, nbytes)   # anonymous mmap: page-aligned, as O_DIRECT needs
        t0 = time.perf_counter()
        got = os.readv(fd, [buf])
        dt = time.perf_counter() - t0
        if got == nbytes:
          return dt, 'o_direct'
      except OSError:
        pass   # e.g. tmpfs accepts the flag at open and refuses the read
      finally:
        os.close(fd)
  fd = os.open(path, os.O_RDONLY)
  try:
    method = 'page_cache'
    if hasattr(os, 'posix_fadvise'):
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      method = 'fadvise_dontneed'
    t0 = time.perf_counter()
    while os.read(fd, 1 << 20):
      pass
    return time.perf_counter() - t0, method
  finally:
    os.close(fd)


def measure_tier_bandwidth(mbytes: int = 8, repeats: int = 3, directory: str | None = None) -> dict:
  """Per-tier read bandwidth on this machine, for the TierSet latency prediction (litejax.tiersets):
  `host_bytes_per_s` (host cache -> device slot: a host-memory copy) and `disk_bytes_per_s` (a temporary
  file of `mbytes` MiB in `directory` read back once per repeat, median), with `disk_method` saying how
  the page cache was kept out ('o_direct', 'fadvise_dontneed', or 'page_cache': then the figure is the
  page cache's, not the disk's, and the prediction's disk term is optimistic)."""
  import os
  import tempfile
  if mbytes < 1 or repeats < 1:
    raise ValueError(f'measure_tier_bandwidth: mbytes and repeats must be >= 1, got {mbytes}, {repeats}')
  nbytes = mbytes * 2 ** 20
  fd, path = tempfile.mkstemp(prefix='litejax-disk-probe-', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(os.urandom(nbytes))
      f.flush()
      os.fsync(f.fileno())
    runs = [_read_uncached(path, nbytes) for _ in range(repeats)]
  finally:
    os.unlink(path)
  methods = {m for _, m in runs}
  return {'host_bytes_per_s': _host_copy_bytes_per_s(mbytes, repeats),
          'disk_bytes_per_s': nbytes / statistics.median(t for t, _ in runs),
          'disk_method': max(methods, key=('o_direct', 'fadvise_dontneed', 'page_cache').index),
          'probe_bytes': nbytes}


def measure_expert_ops(store, samples: int = 8) -> dict:
  """Per-expert I/O operation times on this machine, at the granularity the tiered decode moves experts
  (median seconds): `disk_read_s`, one expert read from `store` (TensorStore, one chunk per array; experts
  spread over the store, so a repeat is not a cache hit of TensorStore's own), and `slot_load_s`, one
  expert copied host -> device slot (litejax.store.slots). At small expert sizes these are set by
  per-call latency, not bandwidth, which `measure_tier_bandwidth` alone would miss. The disk figure may
  come from the page cache when the store's files are cached."""
  import time

  import jax
  import numpy as np

  from litejax.store.slots import DeviceSlots
  rng = np.random.default_rng(0)
  layer = store.layers[-1]
  ids = rng.choice(store.num_experts, size=min(samples, store.num_experts), replace=False)
  reads, got = [], None
  for e in ids:
    t0 = time.perf_counter()
    got = store.read_experts(layer, [int(e)])
    reads.append(time.perf_counter() - t0)
  slots = DeviceSlots(1, store.shapes, store.dtype, 1)
  slots.load([0], got)   # compiles the slot update once
  loads = []
  for _ in range(samples):
    t0 = time.perf_counter()
    slots.load([0], got)
    jax.block_until_ready(slots.buffers)
    loads.append(time.perf_counter() - t0)
  return {'disk_read_s': statistics.median(reads), 'slot_load_s': statistics.median(loads)}
