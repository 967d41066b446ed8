"""SPEC-006's latency scaling laws as a model: step time = compute + communication + memory traffic.

Per chip and per step:
  compute        FLOPs / peak FLOP/s
  communication  collective bytes / ICI bandwidth (bidirectional, all links of the chip)
  memory         bytes accessed / HBM bandwidth
The terms are added, not overlapped, so the estimate is what a step costs with nothing hidden behind
anything else; each term is a lower bound for its own resource. The report names the dominant term:
the spec expects arithmetic to stop being the limit at scale ("memory bandwidth and communication
become the limiting factors").

`calibrate` checks the model where it can be checked, on this CPU: it measures the machine's matmul
FLOP/s and memory bandwidth, predicts the step time of several configs from their compiled
cost_analysis(), times them, and reports predicted vs measured. Trust the model on a pod only if here
it ranks the configs correctly and lands within 2x.
"""
from __future__ import annotations

import dataclasses
import statistics

from litejax import hardware
from litejax.timing import best_time, time_calls

TERMS = ('compute', 'communication', 'memory')


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A step-time estimate, term by term (seconds)."""
  compute_s: float
  communication_s: float
  memory_s: float

  @property
  def total_s(self) -> float:
    return self.compute_s + self.communication_s + self.memory_s

  @property
  def dominant(self) -> str:
    return max(TERMS, key=lambda t: getattr(self, f'{t}_s'))

  def as_dict(self) -> dict:
    return {'compute_s': self.compute_s, 'communication_s': self.communication_s, 'memory_s': self.memory_s,
            'total_s': self.total_s, 'dominant': self.dominant}


def estimate(flops: float, collective_bytes: float, bytes_accessed: float, chip: hardware.Chip) -> Estimate:
  """Step time of one chip's share: FLOPs, collective bytes and HBM bytes of that chip for one step."""
  return Estimate(compute_s=flops / chip.peak_flops,
                  communication_s=collective_bytes / chip.ici_bytes_per_s if collective_bytes else 0.0,
                  memory_s=bytes_accessed / chip.hbm_bytes_per_s)


def format_estimate(est: dict, h) -> str:
  t = est['total_s']
  parts = ', '.join(f"{name} {_seconds(est[f'{name}_s'])} ({100 * est[f'{name}_s'] / t:.0f}%)" if t else name
                    for name in TERMS)
  return f"step time   {_seconds(t)} = {parts}; dominated by {est['dominant']}"


def _seconds(s: float) -> str:
  if s >= 1:
    return f'{s:.3g} s'
  if s >= 1e-3:
    return f'{s * 1e3:.3g} ms'
  return f'{s * 1e6:.3g} us'


# ------------------------------------------------------------------------------------------ calibrate

def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """This machine's f32 matmul FLOP/s: an [n, n] @ [n, n] chain (2·n³ FLOPs per product)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32) / n
  steps = 4

  @jax.jit
  def chain(x):
    for _ in range(steps):   # several products per call, so dispatch overhead is amortised
      x = x @ a
    return x

  return steps * 2 * n ** 3 / best_time(chain, a, repeats=repeats)


def measure_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
  """This machine's memory bandwidth: x*a+b in place over a large f32 array (read + write per element).

  The input is donated so every call writes into the same buffer: a fresh output each call would
  time the kernel's page faults, not memory.
  """
  import jax
  import jax.numpy as jnp
  n = mbytes * 2 ** 20 // 4
  f = jax.jit(lambda x: x * 1.0001 + 1e-3, donate_argnums=0)
  x = jnp.ones((n,), jnp.float32)
  calls = 4

  def run():
    nonlocal x
    for _ in range(calls):   # several calls per timing, so dispatch overhead is amortised
      x = f(x)
    return x

  return 2 * n * 4 * calls / min(time_calls(run, repeats))


# The configs timed by `calibrate`: configs/tiny.yaml with these overrides, chosen to span
# compute-bound (wide, long) to memory/overhead-heavy (narrow, short) forward passes.
CALIBRATION_CONFIGS = {
    'tiny': [],
    'tiny-d256': ['model.d_model=256', 'moe.d_expert=256', 'model.d_ff=512'],
    'tiny-d512': ['model.d_model=512', 'moe.d_expert=512', 'model.d_ff=1024', 'model.num_heads=8',
                  'model.num_kv_heads=4'],
    'tiny-L8-s256': ['model.num_layers=8', 'model.seq_len=256'],
}
QUICK_CONFIGS = {
    'tiny-s32': ['model.seq_len=32', 'model.num_layers=1'],
    'tiny-s64': ['model.seq_len=64', 'model.num_layers=2'],
}


def _time_config(cfg, batch: int, repeats: int) -> tuple[dict, float]:
  """(per-step cost_analysis, measured seconds) of one config's jitted forward on one CPU device."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from litejax.model import init_model
  model = init_model(cfg, seed=0)
  graphdef, state = nnx.split(model)

  def forward(state, tokens_bs):
    return nnx.merge(graphdef, state)(tokens_bs)[0]

  tokens = jnp.zeros((batch, cfg.model.seq_len), jnp.int32)
  f = jax.jit(forward)
  compiled = f.lower(state, tokens).compile()
  ca = compiled.cost_analysis()
  seconds = best_time(compiled, state, tokens, repeats=repeats)
  return {'flops': float(ca.get('flops', 0.0)), 'bytes_accessed': float(ca.get('bytes accessed', 0.0))}, seconds


def _spearman_ok(pred: list[float], meas: list[float]) -> bool:
  """Whether the prediction orders the configs as the measurement does."""
  return sorted(range(len(pred)), key=pred.__getitem__) == sorted(range(len(meas)), key=meas.__getitem__)


def calibrate(configs: dict[str, list[str]] | None = None, *, base: str | None = None, batch: int = 8,
              repeats: int = 5, quick: bool = False) -> dict:
  """Measure this CPU, predict each config's forward step time with the model, time it, compare.

  Runs on one device (the first CPU device of this process), layers unrolled so that cost_analysis()
  sees every layer. Returns the host chip facts, one row per config (flops, bytes, predicted terms,
  measured seconds, ratio) and whether the model ranks them right and lands within 2x.
  """

  from litejax.config import load_config
  if base is None:
    base = 'tiny'   # the shipped config (litejax.config.resolve_config_path)
  if configs is None:
    configs = QUICK_CONFIGS if quick else CALIBRATION_CONFIGS
  if quick:
    repeats, batch = min(repeats, 2), min(batch, 2)
  peak = measure_peak_flops(256 if quick else 1024, repeats)
  bw = measure_bandwidth(16 if quick else 256, repeats)
  host = hardware.host_chip(peak, bw)
  rows = []
  for name, overrides in configs.items():
    cfg = load_config(base, list(overrides) + ['model.scan_layers=false', 'mesh.data=1'])
    ca, seconds = _time_config(cfg, batch, repeats)
    est = estimate(ca['flops'], 0.0, ca['bytes_accessed'], host)
    rows.append({'name': name, 'overrides': list(overrides), 'flops': ca['flops'],
                 'bytes_accessed': ca['bytes_accessed'], **est.as_dict(), 'measured_s': seconds,
                 'predicted_over_measured': est.total_s / seconds})
  pred = [r['total_s'] for r in rows]
  meas = [r['measured_s'] for r in rows]
  ratios = [r['predicted_over_measured'] for r in rows]
  return {
      'host': {'peak_flops': peak, 'mem_bytes_per_s': bw},
      'batch': batch, 'repeats': repeats, 'rows': rows,
      'ranks_correctly': _spearman_ok(pred, meas),
      'within_2x': all(0.5 <= r <= 2.0 for r in ratios),
      'geomean_ratio': statistics.geometric_mean(ratios) if ratios else None,
  }


def format_calibration(rep: dict, h) -> list[str]:
  host = rep['host']
  lines = [f"host: matmul peak {h(host['peak_flops'])}FLOP/s (f32), memory bandwidth "
           f"{h(host['mem_bytes_per_s'])}B/s   (forward, batch {rep['batch']}, best of {rep['repeats']})",
           f"{'config':14s} {'FLOPs':>8s} {'bytes':>8s} {'compute':>9s} {'memory':>9s} {'predicted':>10s} "
           f"{'measured':>9s} {'pred/meas':>9s}  dominant"]
  for r in rep['rows']:
    lines.append(f"{r['name']:14s} {h(r['flops']):>8s} {h(r['bytes_accessed']):>8s} {_seconds(r['compute_s']):>9s} "
                 f"{_seconds(r['memory_s']):>9s} {_seconds(r['total_s']):>10s} {_seconds(r['measured_s']):>9s} "
                 f"{r['predicted_over_measured']:9.2f}  {r['dominant']}")
  lines.append(f"ranks configs correctly: {'yes' if rep['ranks_correctly'] else 'NO'};  within 2x of measured: "
               f"{'yes' if rep['within_2x'] else 'NO'};  geometric-mean predicted/measured "
               f"{rep['geomean_ratio']:.2f}")
  return lines
