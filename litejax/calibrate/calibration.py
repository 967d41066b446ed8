"""`litejax calibrate`: the latency model (litejax.perf.latency) checked against timed steps on this CPU.

The host chip is measured by the probes of litejax.perf.probes (peak FLOP/s, streaming, transpose
and gather bandwidths, seconds per sort comparison, per-kernel and per-host-call overheads).
Then several configs/tiny.yaml variants are compiled (forward, one device, layers unrolled), their
step time predicted by latency.estimate_compiled on the measured host chip, and timed.

Timing is interleaved: every round times each probe and each step once, and each keeps its median
over the rounds. On a machine shared with other work the host's figures and the step times are then
taken under the same conditions, not minutes apart; the median, not the fastest run, because a short
probe's fastest run slips into a moment the other work left both cores free, which a long step's
never does (the fastest runs made the host look faster than the long steps it predicted).
"""
from __future__ import annotations

import statistics

from litejax import units
from litejax.perf import latency
from litejax.perf import probes as hp, timing
from litejax.perf.host import host_probes

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
def _config_step(cfg, batch: int):
  """(compiled forward, a call of it) of one config on one CPU device."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from litejax.model.transformer import init_model
  graphdef, state = nnx.split(init_model(cfg, seed=0))

  def forward(state, tokens_bs):
    return nnx.merge(graphdef, state)(tokens_bs)[0]

  tokens = jnp.zeros((batch, cfg.model.seq_len), jnp.int32)
  compiled = jax.jit(forward).lower(state, tokens).compile()
  return compiled, lambda: compiled(state, tokens)


def _ranks_agree(pred: list[float], meas: list[float]) -> bool:
  """Whether the prediction orders the configs as the measurement does."""
  return sorted(range(len(pred)), key=pred.__getitem__) == sorted(range(len(meas)), key=meas.__getitem__)


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
  plan += [(n, o, b, hp.SHORT_STEP_CALLS) for n, (o, b) in decode.items()]
  steps, timed = {}, []
  for name, overrides, b, calls in plan:
    cfg = load_config(base, list(overrides) + ['model.scan_layers=false', 'mesh.data=1'])
    compiled, call = _config_step(cfg, b)
    steps[name] = (compiled, b, list(overrides))
    timed.append(timing.Timed(name, call, calls))
  probes, measured_host = host_probes(quick)
  best = timing.median_interleaved(probes + timed, repeats)
  return {**compare(steps, measured_host(best), best), 'batch': batch, 'repeats': repeats}


def compare(steps: dict[str, tuple], host, measured_s: dict[str, float]) -> dict:
  """The calibration verdict: each step (name -> (compiled, batch, overrides)) predicted on `host` (a
  hardware.Chip) by latency.estimate_compiled, one jitted call per timing, beside its measured seconds;
  whether the predictions rank the steps as the measurements do, lie within latency.TRUST_BAND (and
  2x) of them, and their geometric-mean ratio; the host's figures."""
  rows = []
  for name, (compiled, b, overrides) in steps.items():
    est = latency.estimate_compiled(compiled, host, host_calls=1)   # each timing: one jitted call
    rows.append({'name': name, 'overrides': overrides, 'batch': b, **est, 'measured_s': measured_s[name],
                 'predicted_over_measured': est['total_s'] / measured_s[name]})
  ratios = [r['predicted_over_measured'] for r in rows]
  lo, hi = latency.TRUST_BAND
  return {
      'host': {'peak_flops': host.peak_flops, 'mem_bytes_per_s': host.hbm_bytes_per_s,
               'transpose_bytes_per_s': host.transpose_bytes_per_s, 'kernel_overhead_s': host.kernel_overhead_s,
               'call_overhead_s': host.call_overhead_s, 'gather_bytes_per_s': host.gather_bytes_per_s,
               'sort_comparison_s': host.sort_comparison_s},
      'rows': rows,
      'ranks_correctly': _ranks_agree([r['total_s'] for r in rows], [r['measured_s'] for r in rows]),
      'within_band': all(lo <= r <= hi for r in ratios), 'band': [lo, hi],
      'within_2x': all(0.5 <= r <= 2.0 for r in ratios),
      'geomean_ratio': statistics.geometric_mean(ratios) if ratios else None,
  }


def format_calibration(rep: dict) -> list[str]:
  """The calibration report as lines of text: the host, one line per row, the verdicts."""
  h, s, host = units.si, units.seconds, rep['host']
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
  import numpy as np
  src = np.ones(mbytes * 2 ** 20, np.uint8)
  dst = np.empty_like(src)
  # the warm-up copy keeps the first touch of dst's pages out
  return src.nbytes / statistics.median(timing.time_calls(lambda: np.copyto(dst, src), repeats))


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


def measure_level_bandwidth(mbytes: int = 8, repeats: int = 3, directory: str | None = None) -> dict:
  """Per-level read bandwidth on this machine, for the TierSet latency prediction (litejax.inference.tiersets):
  `host_bytes_per_s` (host cache -> device slot: a host-memory copy) and `disk_bytes_per_s` (a temporary
  file of `mbytes` MiB in `directory` read back once per repeat, median), with `disk_method` saying how
  the page cache was kept out ('o_direct', 'fadvise_dontneed', or 'page_cache': then the figure is the
  page cache's, not the disk's, and the prediction's disk term is optimistic)."""
  import os
  import tempfile
  if mbytes < 1 or repeats < 1:
    raise ValueError(f'measure_level_bandwidth: mbytes and repeats must be >= 1, got {mbytes}, {repeats}')
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
  expert copied host -> device slot (litejax.inference.store.slots). At small expert sizes these are set by
  per-call latency, not bandwidth, which `measure_level_bandwidth` alone would miss. The disk figure may
  come from the page cache when the store's files are cached."""
  import numpy as np

  from litejax.inference.store.slots import DeviceSlots
  rng = np.random.default_rng(0)
  layer = store.layers[-1]
  n = min(samples, store.num_experts)
  ids = iter(rng.choice(store.num_experts, size=n, replace=False))
  read = {}

  def read_next():   # a different expert each run
    read['got'] = store.read_experts(layer, [int(next(ids))])
    return read['got']

  reads = timing.time_calls(read_next, n, warmup=0)
  slots = DeviceSlots(1, store.shapes, store.dtype, 1)

  def load():
    slots.load([0], read['got'])
    return slots.buffers

  loads = timing.time_calls(load, samples)   # the warm-up run compiles the slot update
  return {'disk_read_s': statistics.median(reads), 'slot_load_s': statistics.median(loads)}
