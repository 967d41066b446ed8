"""The experts series of bench_train.py (`--series experts`): a whole train step at fixed tokens per
step while the experts per layer grow from N·K/4 to 32·N·K, dense vs sparse expert updates, beside the
dense model with the same active parameters.

    python experiments/bench_train.py --series experts --out experiments/results           # ~12 min
    python experiments/bench_train.py --series experts --quick --out /tmp/bench            # < 60 s

Model: one MoE layer, d = 32, small MLP experts (h = 8), K = 4, 4 sequences of 128 tokens (N = 512,
N·K = 2,048, so E runs 512 ... 65,536). Routing is three-level (T tiers × G groups × E_g = 8 experts,
k_tier = k_group = 1, k_expert = 4, T·G = E/8 split evenly): the router's own per-token work then grows
as T + G + E_g ~ sqrt(E), not E, so the series measures the update, not a flat router over 65,536 rows.

Each E runs in its own process (a fresh heap), which builds three train steps — the dense update, the
sparse update and the dense model (`bench_train.dense_overrides`: one FFN of hidden K·h) — and times
them in interleaved rounds (one step of each per round), so the machine's load falls on all three
alike; `step_seconds` is the median over the timed rounds after warm-up (`step_seconds_min` the fastest).

`peak_bytes`: the compiled step's memory_analysis (litejax.analysis.targets.memory_per_device: arguments +
outputs - aliased donated state + temporaries), the executable the timing ran (its AOT compile is a
cache hit after the first call). `optimizer_bytes_per_step`: bytes accessed by the instructions under
the train step's `optimizer` scope in that executable's HLO, as `litejax bound --train` reports
`optimizer.bytes_accessed_per_step` (litejax.analysis.bound.report).
"""
from __future__ import annotations

import math
import statistics
import time

TOKENS = {'batch': 4, 'seq_len': 128}          # N = 512 tokens per step
QUICK_TOKENS = {'batch': 1, 'seq_len': 128}    # N = 128
K, EXPERTS_PER_GROUP = 4, 8
BASE = ['model.d_model=32', 'model.num_layers=1', 'model.num_heads=2', 'model.num_kv_heads=1',
        'model.vocab_size=256', 'model.ffn_kind=mlp', 'model.moe_every=1', 'moe.num_shared_experts=0',
        'moe.expert_kind=mlp', 'moe.d_expert=8', 'moe.k_tier=1', 'moe.k_group=1', f'moe.k_expert={K}',
        f'moe.experts_per_group={EXPERTS_PER_GROUP}', 'mesh.data=1', 'mesh.expert=1', 'mesh.tensor=1']
UPDATES = ('dense', 'sparse', 'dense_model')


def experts_grid(nk: int, quick: bool) -> list[int]:
  """E per layer: N·K/4, N·K/2, ..., 32·N·K (quick: 4·N·K only, three compiles)."""
  if quick:
    return [4 * nk]
  return [nk * 2 ** i // 4 for i in range(8)]


def overrides(experts: int, tokens: dict) -> list[str]:
  """The MoE config at `experts` per layer: T·G = E/E_g parents, T the power of two nearest sqrt."""
  parents = experts // EXPERTS_PER_GROUP
  if parents * EXPERTS_PER_GROUP != experts or parents & (parents - 1):
    raise ValueError(f'experts: must be {EXPERTS_PER_GROUP} x a power of two, got {experts}')
  tiers = 2 ** (int(math.log2(parents)) // 2)
  return BASE + [f'moe.num_tiers={tiers}', f'moe.groups_per_tier={parents // tiers}',
                 f'model.seq_len={tokens["seq_len"]}', f'train.batch_size={tokens["batch"]}']


def _configs(experts: int, tokens: dict) -> dict:
  from bench_train import dense_overrides

  from litejax.config import load_config
  moe = overrides(experts, tokens)
  cfg = load_config('tiny', moe)
  return {'dense': load_config('tiny', moe + ['train.expert_update=dense']),
          'sparse': load_config('tiny', moe + ['train.expert_update=sparse']),
          'dense_model': load_config('tiny', moe + dense_overrides(cfg))}


def interleaved_times(calls: dict, steps: int, warmup: int) -> dict[str, list[float]]:
  """Seconds of each timed call per call name, one call of each per round (after `warmup` rounds)."""
  import jax
  times = {k: [] for k in calls}
  for r in range(warmup + steps):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      if r >= warmup:
        times[name].append(time.perf_counter() - t0)
  return times


def _analyse(cfg, mesh, step, state, inputs, targets) -> dict:
  """peak bytes and optimizer bytes of the executable that ran (AOT compile: a cache hit)."""
  from litejax.model import bounds
  from litejax.analysis import bound as bound_report
  from litejax.hlo.scopes import dot_signatures
  from litejax.analysis.targets import memory_per_device
  t0 = time.perf_counter()
  traced = step.trace(state, inputs, targets)
  compiled = traced.lower().compile()
  prog = bound_report.CompiledProgram(compiled, compiled.as_text(), cfg, mesh, True, inputs.shape[0], inputs.shape[1],
                              time.perf_counter() - t0, False, dot_signatures(traced.jaxpr, bounds.COMPONENTS))
  rep = bound_report.report(prog)
  mem = memory_per_device(compiled)
  return {'peak_bytes': mem['total'], 'memory_bytes': mem, 'temp_bytes': mem['temp'],
          'bytes_accessed_per_step': rep['bytes_accessed_per_token'] * prog.tokens,
          'optimizer_bytes_per_step': rep['optimizer']['bytes_accessed_per_step'],
          'aot_seconds': prog.compile_seconds}


def measure(experts: int, tokens: dict, steps: int, warmup: int = 2) -> list[dict]:
  """Rows of the three programs at `experts` per layer, timed side by side in this process."""
  import jax

  from bench_train import build
  from litejax import jaxcompat
  from litejax.model import bounds
  from litejax.train.sparse_step import update_mode
  built = {name: build(cfg, 1) for name, cfg in _configs(experts, tokens).items()}
  calls, rows = {}, []
  for name, b in built.items():
    def one(b=b):
      b['state'], metrics = b['step'](b['state'], b['inputs'], b['targets'])
      return metrics['loss']
    calls[name] = one
  with jax.set_mesh(built['dense']['mesh']):
    for name, call in calls.items():   # the first call compiles
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      built[name]['first_step_seconds'] = time.perf_counter() - t0
    times = interleaved_times(calls, steps, warmup)
    for name, b in built.items():
      cfg = b['cfg']
      n = tokens['batch'] * tokens['seq_len']
      rows.append({'series': 'experts', 'update': name, 'experts': experts, 'tokens_per_step': n,
                   'nk': n * K, 'resolved_update': update_mode(cfg, b['mesh']) if name != 'dense_model' else 'dense',
                   'step_seconds': statistics.median(times[name]), 'step_seconds_min': min(times[name]),
                   'timed_steps': steps, 'first_step_seconds': b['first_step_seconds'],
                   'compiles': jaxcompat.compiled_variants(b['step']), 'loss_last': float(calls[name]()),
                   'params_total': bounds.param_counts(cfg).total,
                   'params_active_per_token': bounds.param_counts(cfg).active_per_token,
                   'peak_bytes_source': 'memory_analysis: arguments + outputs - aliased + temporaries',
                   **_analyse(cfg, b['mesh'], b['step'], b['state'], b['inputs'], b['targets'])})
  return rows


def _by(rows, update):
  return {r['experts']: r for r in rows if r['update'] == update and r.get('step_seconds')}


def summary(rows: list[dict]) -> dict:
  """Targets (E >= N·K: sparse max/min <= 1.3, sparse / dense model <= 2 at every E; optimizer bytes
  flat on the sparse path) and the dense update's growth beside them."""
  sparse, dense, model = _by(rows, 'sparse'), _by(rows, 'dense'), _by(rows, 'dense_model')
  nk = rows[0]['nk']
  big = sorted(e for e in sparse if e >= nk)
  ratio = lambda a, b: a / b if b else None  # noqa: E731
  spread = lambda xs: ratio(max(xs), min(xs)) if xs else None  # noqa: E731
  per_e = lambda a, b, es: {str(e): ratio(a[e]['step_seconds'], b[e]['step_seconds']) for e in es if e in b}  # noqa: E731
  over_model = per_e(sparse, model, sorted(sparse))
  dense_over_model = per_e(dense, model, sorted(dense))
  out = {
      'nk': nk, 'experts': sorted(sparse), 'experts_at_or_above_nk': big,
      'sparse_step_max_over_min': spread([sparse[e]['step_seconds'] for e in big]),
      'sparse_over_dense_model': over_model,
      'sparse_over_dense_model_max': max((v for v in over_model.values() if v), default=None),
      # the fastest of the timed steps: what the machine can do, less exposed to other jobs' load
      'sparse_step_max_over_min_by_fastest': spread([sparse[e]['step_seconds_min'] for e in big]),
      'sparse_over_dense_model_max_by_fastest': max((ratio(sparse[e]['step_seconds_min'], model[e]['step_seconds_min'])
                                                     for e in big if e in model), default=None),
      'dense_step_max_over_min': spread([dense[e]['step_seconds'] for e in big if e in dense]),
      'dense_over_dense_model': dense_over_model,
      'dense_over_sparse': per_e(dense, sparse, [e for e in big if e in dense]),
      'sparse_optimizer_bytes_max_over_min': spread([sparse[e]['optimizer_bytes_per_step'] for e in big]),
      'dense_optimizer_bytes_max_over_min': spread([dense[e]['optimizer_bytes_per_step'] for e in big if e in dense]),
      'sparse_peak_bytes_max_over_min': spread([sparse[e]['peak_bytes'] for e in big]),
      'sparse_temp_bytes_max_over_min': spread([sparse[e]['temp_bytes'] for e in big]),
      'dense_temp_bytes_max_over_min': spread([dense[e]['temp_bytes'] for e in big if e in dense]),
      'dense_peak_bytes_max_over_min': spread([dense[e]['peak_bytes'] for e in big if e in dense]),
      'targets': {'sparse_step_max_over_min': 1.3, 'sparse_over_dense_model_max': 2.0,
                  'sparse_optimizer_bytes_max_over_min': 1.3},
  }
  out['pass'] = {k: out[k] is not None and out[k] <= t for k, t in out['targets'].items()}
  return out


def plot(rows: list[dict], path) -> None:
  """Step time and peak memory (and the updates' temporaries) vs E (log x), one line per update, N·K marked."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
  for update, style in zip(UPDATES, ('o-', 's-', '^--')):
    got = sorted(_by(rows, update).items())
    xs = [e for e, _ in got]
    a.plot(xs, [r['step_seconds'] * 1e3 for _, r in got], style, label=update)
    line, = b.plot(xs, [r['peak_bytes'] / 1e6 for _, r in got], style, label=f'{update} peak')
    if update != 'dense_model':
      b.plot(xs, [r['temp_bytes'] / 1e6 for _, r in got], ':', color=line.get_color(), label=f'{update} temporaries')
  for ax, ylabel in ((a, 'train step (ms, median)'), (b, 'MB per device (memory_analysis)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.axvline(rows[0]['nk'], color='grey', lw=0.8, ls=':')
    ax.set_xlabel('experts per layer (N·K dotted)')
    ax.set_ylabel(ylabel)
    ax.legend()
  fig.suptitle(f"one train step, {rows[0]['tokens_per_step']} tokens: dense vs sparse expert update")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
