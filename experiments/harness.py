"""What the scripts of experiments/ share, so that no script imports another (tests/test_layering.py):

  command line   `parser`: the description, --out (the results folder), --quick, --repeats;
                 `add_layer_shape` (one MoE layer's d, h, K)
  results        `out_dir`, `write_json`, `machine` (the facts a figure is read against), `cpu_share`
  timing         `time_compiled` (compile ahead, then litejax.perf.timing), `compiles` (a jitted
                 function's compile count)
  figures        `figure`, `style`, `save`: the headless backend, log axes, labels, one PNG
  child process  `child_env` (JAX platform, emulated CPU devices), `run_json` (a worker's JSON line)
  fixtures       the tiers benchmarks' trained checkpoint (pre-gated or not) and its val loss, store
                 (exported, or of random weights), prompt and tiered decode (bench_tiers,
                 lookahead_recall, tierset_latency); the training benchmarks' step builder
                 and dense twin (bench_train, bench_train_experts, gpu_check.sh); the decode rows' models
                 (bench_decode, decode_breakdown)

Imports JAX only inside the functions that need it: bench_train's and bench_train_experts' drivers set the
children's XLA_FLAGS and never load JAX themselves.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform as _platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / 'experiments'
if str(REPO) not in sys.path:    # litejax from a checkout that is not pip-installed
  sys.path.insert(0, str(REPO))

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


# ------------------------------------------------------------------------------------------ command line

def parser(doc: str, *, out: str = 'required', quick: str | None = None, repeats: int | None = None,
           repeats_help: str = 'timed runs per row (the median kept)') -> argparse.ArgumentParser:
  """An ArgumentParser described by the first line of the script's docstring, with --out ('required',
  'optional' or 'none'), --quick when `quick` (its help) is given, and --repeats when `repeats` (its
  default) is."""
  p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
  if out != 'none':
    p.add_argument('--out', required=out == 'required', help='the results folder (created if missing)')
  if quick is not None:
    p.add_argument('--quick', action='store_true', help=quick)
  if repeats is not None:
    p.add_argument('--repeats', type=int, default=repeats, help=repeats_help)
  return p


def add_layer_shape(p: argparse.ArgumentParser) -> None:
  """--d-model, --d-expert and --k of the one-MoE-layer benchmarks (bench_moe, profile_moe)."""
  p.add_argument('--d-model', type=int, default=128)
  p.add_argument('--d-expert', type=int, default=256)
  p.add_argument('--k', type=int, default=2, help='experts per token')


# ------------------------------------------------------------------------------------------ results

def out_dir(path) -> pathlib.Path:
  """The results folder `path`, created with its parents."""
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  return out


def write_json(out: pathlib.Path, name: str, obj, indent: int | None = 1) -> pathlib.Path:
  """Writes `obj` as OUT/NAME (NumPy scalars as floats) and returns the path."""
  path = pathlib.Path(out) / name
  path.write_text(json.dumps(obj, indent=indent, default=float))
  return path


def machine(platform: str | None = None) -> dict:
  """The facts a measurement is read against: CPU, cores, 1-minute load average, Python and jax versions,
  the JAX platform and device kind. `platform`: what a driver that runs JAX in its children only passes
  (its device kind is then None); otherwise both are read from jax when this process has loaded it."""
  facts = {'cpu': _platform.processor() or _platform.machine(), 'cores': os.cpu_count(),
           'load_average': os.getloadavg()[0], 'python': sys.version.split()[0],
           'jax': importlib.metadata.version('jax'), 'platform': platform, 'device': None}
  if 'jax' in sys.modules and platform is None:
    import jax
    dev = jax.devices()[0]
    facts.update(platform=dev.platform, device=str(dev.device_kind))
  return facts


def cpu_share(fn):
  """(fn(), process CPU seconds / wall seconds over the call): up to the threads the work uses, lower
  when other work on the machine takes the cores (a loaded machine, said beside the figures)."""
  w0, c0 = time.perf_counter(), time.process_time()
  result = fn()
  return result, (time.process_time() - c0) / (time.perf_counter() - w0)


def time_compiled(fn, args, repeats: int, *, warmup: int = 1, budget_s: float | None = None):
  """(seconds of each timed run, the compiled program) of jax.jit(fn) compiled ahead for `args`, timed by
  litejax.perf.timing.time_calls (`warmup` untimed runs first; budget_s: stop early, after 3 runs at least)."""
  import jax

  from litejax.perf.timing import time_calls
  compiled = jax.jit(fn).lower(*args).compile()
  return time_calls(lambda: compiled(*args), repeats, warmup=warmup, budget_s=budget_s), compiled


def compiles(jitted) -> int:
  """How many programs a jitted function has compiled (a benchmark asserts its step compiled once)."""
  from litejax import jaxcompat
  return jaxcompat.compiled_variants(jitted)


# ------------------------------------------------------------------------------------------ figures

def figure(ncols: int = 1, figsize=(7, 4.5), headless: bool = True):
  """(figure, axes: one, or an array of `ncols`) in one row. headless: the Agg backend (a script writing
  PNGs); a notebook passes False and draws inline."""
  import matplotlib
  if headless:
    matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig = plt.figure(figsize=figsize)
  return fig, fig.subplots(1, ncols)


def style(ax, xlabel: str, ylabel: str, *, title: str | None = None, xlog: float | None = None,
          ylog: bool = False, legend: float | None = 7) -> None:
  """Labels an axis; xlog: log x axis of that base; ylog: log y; legend: its font size (None: no legend)."""
  if xlog:
    ax.set_xscale('log', base=xlog)
  if ylog:
    ax.set_yscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  if legend:
    ax.legend(fontsize=legend)


def save(fig, path) -> None:
  """Lays out the figure, writes it as a PNG at `path` and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------------------ child processes

def child_env(platform: str | None = None, devices: int | None = None) -> dict[str, str]:
  """This process's environment for a child JAX process: JAX_PLATFORMS=`platform` when given, and on the
  CPU `devices` emulated devices (a device count already in XLA_FLAGS replaced, the other flags kept).
  XLA reads XLA_FLAGS once, at start-up: a device count other than this process's needs a child."""
  env = dict(os.environ)
  if platform:
    env['JAX_PLATFORMS'] = platform
  if devices is not None and (platform or 'cpu') == 'cpu':
    flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env['XLA_FLAGS'] = ' '.join(flags + [f'{_DEVICE_COUNT_FLAG}={devices}'])
  return env


def run_json(cmd: list[str], env: dict[str, str]):
  """Runs a worker that prints its result as JSON on its last line of stdout: (the result, None), or
  (None, the last line of its stderr) when it fails."""
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if r.returncode != 0:
    return None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f'exit {r.returncode}'
  return json.loads(r.stdout.strip().splitlines()[-1]), None


# ------------------------------------------------------------------------------------------ tiers fixtures

PROMPT = 'And God said, Let there be light: and there was light. '
# --quick's tiny_1k: 2 layers, 4 groups per tier, trained 2 steps
QUICK_SETS = ['model.num_layers=2', 'moe.groups_per_tier=4', 'train.batch_size=2', 'train.eval_every=2',
              'train.ckpt_every=2']


def prompt_tokens() -> list[int]:
  """PROMPT as the byte tokens the tiers benchmarks decode from."""
  return [int(b) for b in PROMPT.encode()]


def add_ckpt_dir(p: argparse.ArgumentParser) -> None:
  """--ckpt-dir of the scripts that read a trained tiny_1k (`ckpt_dir`)."""
  p.add_argument('--ckpt-dir', default=None,
                 help='tiny_1k checkpoint (default: runs/tiny_1k/ckpt; --quick: OUT/ckpt), trained if missing')


def ckpt_dir(args, out: pathlib.Path) -> pathlib.Path:
  """--ckpt-dir, or its default: OUT/ckpt under --quick, else runs/tiny_1k/ckpt."""
  return pathlib.Path(args.ckpt_dir or (out / 'ckpt' if args.quick else 'runs/tiny_1k/ckpt'))


def ensure_checkpoint(ckpt: pathlib.Path, quick: bool, pregate: int = 0) -> str:
  """Trains configs/tiny_1k.yaml into `ckpt` unless it already holds a checkpoint ('read' or 'trained'), with
  its metrics beside it (`val_loss`); quick: QUICK_SETS for 2 steps; pregate: with moe.pregate (the same seed
  and data)."""
  if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
    return 'read'
  cmd = [sys.executable, '-m', 'litejax.cli', 'train', '--config', str(REPO / 'configs' / 'tiny_1k.yaml'),
         '--devices', '1', '--ckpt-dir', str(ckpt), '--metrics', str(ckpt.parent / 'metrics.jsonl'), '--quiet']
  if pregate:
    cmd += ['--set', f'moe.pregate={pregate}']
  if quick:
    cmd += ['--steps', '2'] + [a for s in QUICK_SETS for a in ('--set', s)]
  subprocess.run(cmd, check=True, cwd=REPO)
  return 'trained'


def val_loss(ckpt: pathlib.Path) -> dict | None:
  """{'step', 'val_loss'} of the last evaluation in the metrics `ensure_checkpoint` wrote beside `ckpt`."""
  path = ckpt.parent / 'metrics.jsonl'
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
  evals = [r for r in rows if 'val_loss' in r]
  return {'step': evals[-1]['step'], 'val_loss': evals[-1]['val_loss']} if evals else None


def init_store_model(cfg, location: pathlib.Path):
  """(cfg, model without experts, ExpertStore) of randomly initialised `cfg` (seed 0), its experts written to
  `location` once (as `litejax export-experts --init` writes them)."""
  from litejax.inference.store.disk import ExpertStore
  from litejax.inference.store.writer import write_random
  from litejax.inference.store_decode import model_without_experts
  if not (location / 'manifest.json').exists():
    t0 = time.perf_counter()
    write_random(str(location), cfg, 0, overwrite=True)
    print(f'wrote {location} in {time.perf_counter() - t0:.0f} s', flush=True)
  return cfg, model_without_experts(cfg, 0), ExpertStore.open(str(location), cfg)


def load_store_model(ckpt: pathlib.Path, store_dir: pathlib.Path):
  """(cfg, model without experts, ExpertStore) of a checkpoint, its experts exported to `store_dir` once."""
  from litejax.inference.session import load_store_model
  from litejax.inference.store.from_checkpoint import write_from_checkpoint
  if not (store_dir / 'manifest.json').exists():
    write_from_checkpoint(str(store_dir), str(ckpt), overwrite=True)
  cfg, model, store, *_ = load_store_model(str(store_dir), str(ckpt))
  return cfg, model, store


_PROGRAMS: dict = {}


def store_programs() -> dict:
  """One set of the store runtime's jitted programs for every decode of this process
  (litejax.inference.store_programs.build_programs, built on first use): a benchmark's many runtimes then
  compile each program once per model and shape, not once per runtime."""
  if not _PROGRAMS:
    from litejax.inference.store_programs import build_programs
    _PROGRAMS.update(build_programs())
  return _PROGRAMS


def tiered_decode(cfg, model, store, opts, prompt, new_tokens, sampling, seed=0, keep_logits=False, preload=False,
                  record=None, hooks=None):
  """One decode from the store with fresh storage levels; returns (Generation, logits, store report,
  runtime). preload: every expert resident first (`preload_all`); record: a list the decode steps'
  lookups (layer, experts) are appended to (from ExpertLevels.lookup_log); hooks: the runtime's
  (litejax.inference.store_programs.Hooks). The programs are `store_programs()`'s."""
  from litejax.inference.store.levels import ExpertLevels
  from litejax.inference.store.quant import int8_copies
  from litejax.inference.store_decode import StoreRuntime
  tiers = ExpertLevels(store, opts, load_width=cfg.moe.k_active,
                       int8=int8_copies(store) if opts.miss == 'fallback' else None)
  try:
    if preload:
      preload_all(tiers)
    tiers.lookup_log = [] if record is not None else None
    rt = StoreRuntime(cfg, model, tiers, programs=store_programs())
    gen, logits = rt.generate([prompt], new_tokens, sampling, seed, keep_logits=keep_logits, hooks=hooks)
  finally:
    tiers.close()
  if record is not None:    # the decode steps' lookups (the prefill's, step 0, left out)
    record.extend((layer, experts) for step, layer, experts in tiers.lookup_log if step > 0)
  return gen, logits, tiers.report(len(gen.step_s), rt.decode_stall_s, rt.decode_io_wait_s, rt.prefill_counters), rt


def preload_all(tiers) -> None:
  """Every expert of every layer into a device slot (needs device_slots = 1.0): fully resident, read
  straight from disk into the slots (no host-cache copy) and not counted as lookups."""
  store = tiers.store
  for layer in store.layers:
    for start in range(0, store.num_experts, 512):
      ids = list(range(start, min(start + 512, store.num_experts)))
      slots = tiers.caches[layer].access(ids).slots
      arrays = store.read_experts(layer, ids)
      tiers.load_slots(layer, [(int(s), {k: v[i] for k, v in arrays.items()}) for i, s in enumerate(slots)])


# ------------------------------------------------------------------------------------------ training fixtures

def dense_overrides(cfg) -> list[str]:
  """The dense model with the MoE's active FFN parameters: every layer a dense FFN of hidden
  K·h + num_shared·d_shared (the routed and shared experts a token runs)."""
  m = cfg.moe
  hidden = m.k_active * m.d_expert + m.num_shared_experts * m.resolved_d_shared
  return ['model.moe_every=0', f'model.d_ff={hidden}', f'model.ffn_kind={m.expert_kind}']


def build_train_step(cfg, devices: int) -> dict:
  """A config's jitted train step, fresh state and one batch of random tokens on `devices` devices:
  {'cfg', 'mesh', 'step', 'state', 'inputs', 'targets'}."""
  import jax
  import numpy as np

  from litejax import sharding
  from litejax.train import step as train_step
  from litejax.train.optimizer import make_optimizer
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:devices])
  tx = make_optimizer(cfg.train)
  graphdef, _, shardings = train_step.state_layout(cfg, mesh, tx)
  batch_sh = sharding.batch_sharding(mesh)
  step = train_step.make_train_step(cfg, graphdef, tx, shardings, batch_sh)
  b, s = cfg.train.batch_size, cfg.model.seq_len
  tok = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(b, s + 1)).astype(np.int32)
  return {'cfg': cfg, 'mesh': mesh, 'step': step, 'state': train_step.init_state(cfg, mesh, tx, shardings),
          'inputs': jax.device_put(tok[:, :-1], batch_sh), 'targets': jax.device_put(tok[:, 1:], batch_sh)}


# ------------------------------------------------------------------------------------------ decode rows

# Every decode row has configs/tiny.yaml's dims with layers unrolled (a layer scan slices each layer's
# whole expert table before the gather: `litejax bound --decode` reports it) and K = 4 routed experts.
# experts per layer -> routing (tiers x groups x experts per group, k at each level).
DECODE_ROUTING = {
    16: ['moe.num_tiers=1', 'moe.groups_per_tier=1', 'moe.experts_per_group=16', 'moe.k_group=1'],
    256: ['moe.num_tiers=1', 'moe.groups_per_tier=16', 'moe.experts_per_group=16', 'moe.k_group=1'],
    4096: ['moe.num_tiers=16', 'moe.groups_per_tier=16', 'moe.experts_per_group=16', 'moe.k_group=1'],
    16384: ['moe.num_tiers=16', 'moe.groups_per_tier=16', 'moe.experts_per_group=64', 'moe.k_group=1'],
}


def decode_overrides(experts: int | None) -> list[str]:
  """configs/tiny.yaml overrides of a decode row: the MoE at `experts` per layer, or (None) the dense
  model with its active parameters (every layer a GLU FFN of K·h hidden units: `dense_overrides`' rule)."""
  base = ['model.scan_layers=false', 'mesh.data=1']
  if experts is None:
    return base + ['model.moe_every=0', 'model.d_ff=256', 'model.ffn_kind=glu']
  return base + DECODE_ROUTING[experts] + ['moe.k_tier=1', 'moe.k_expert=4']


@dataclasses.dataclass
class DecodeRow:
  """One decode row's model on one device, from random weights, and its batch of prompts."""
  cfg: object
  mesh: object
  runtime: object          # litejax.inference.decode's runtime for (batch, max_len)
  params: object
  extra: object
  prompts: list[list[int]]

  def bound_report(self, chip) -> dict:
    """litejax.analysis.decode_bound's report of this row's step compiled from abstract shapes, priced on `chip`."""
    from litejax.analysis import decode_bound
    rt = self.runtime
    return decode_bound.report(decode_bound.compile_step(self.cfg, batch=rt.batch, cache_len=rt.max_len,
                                                         mesh=self.mesh), chip)


def decode_row(experts: int | None, batch: int, prompt_len: int, new_tokens: int) -> DecodeRow:
  """The row's model (`decode_overrides`), its runtime for prompt_len + new_tokens and `batch` prompts."""
  import jax
  from flax import nnx

  from litejax import sharding
  from litejax.config import load_config
  from litejax.inference import decode
  from litejax.model.transformer import init_model
  cfg = load_config(REPO / 'configs' / 'tiny.yaml', decode_overrides(experts))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  rt = decode.make_runtime(cfg, mesh, batch, prompt_len + new_tokens)
  _, params, extra = nnx.split(init_model(cfg, seed=0), nnx.Param, ...)
  prompts = [[(7 * i + 3 * j) % 256 for j in range(prompt_len)] for i in range(batch)]
  return DecodeRow(cfg, mesh, rt, params, extra, prompts)
