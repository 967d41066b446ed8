"""Training: the loop around the jitted step of litejax.train.step.

`train()` reads top to bottom: setup (mesh, data, state), steps, the loop (step, log, eval,
checkpoint, stop on a signal), and the end of the run (final eval, plot). Batches are a pure
function of (train.seed, step), so `step` alone is the data position and a resumed run replays
exactly. Logged `loss` and `val_loss` are the cross-entropy alone (see litejax.train.step).
The steps run under `jax.set_mesh(mesh)`, which is how the MoE layers pick their dispatch.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from litejax.model import bounds
from litejax.train import sparse_step as sparse_train
from litejax import sharding as shd
from litejax.train.checkpoint import Checkpointer, holds_optimizer_state
from litejax.config import Config
from litejax.train.data import TokenDataset, global_batch_to_device
from litejax.train.metrics import MetricsWriter, plot_metrics
from litejax.train.progress import Progress, make_record, printer
from litejax.train.optimizer import make_optimizer
from litejax.train.step import all_finite, init_opt_state, init_state, make_eval_step, make_train_step, state_layout
from litejax.train.tokenizer import text_encoder


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient; `step` is the update that did."""

  def __init__(self, step: int, last_checkpoint: int | None, ckpt_dir: str | None):
    where = (f'last good checkpoint: step {last_checkpoint} in {ckpt_dir} (not overwritten)'
             if last_checkpoint is not None else 'no checkpoint was written')
    super().__init__(f'non-finite loss at step {step}; stopping. {where}')
    self.step = step
    self.last_checkpoint = last_checkpoint


@dataclasses.dataclass
class TrainResult:
  """What `train` returns. status: 'done' | 'stopped' (--stop-after) | 'interrupted' (signal)."""
  status: str
  step: int
  val_loss: float | None
  history: list[dict[str, Any]]
  seconds: float


def peak_flops_per_device(device: Any) -> float | None:
  """Dense bf16 peak of one device (litejax.perf.chips), or None (CPU, unknown chips)."""
  from litejax.perf.chips import peak_flops_for_device_kind
  return peak_flops_for_device_kind(getattr(device, 'device_kind', ''))


class _StopFlag:
  """SIGINT/SIGTERM set a flag the loop checks after each step (so the state it saves is whole);
  a second SIGINT raises KeyboardInterrupt as usual."""

  def __init__(self):
    self.signal: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, no graceful stop
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# ---------------------------------------------------------------------------- the loop

def train(cfg: Config, *, ckpt_dir: str | pathlib.Path | None = None, resume: bool = False,
          stop_after: int | None = None, metrics_path: str | pathlib.Path | None = None,
          data_path: str | None = None, plot_path: str | pathlib.Path | None = None,
          mesh: Mesh | None = None, quiet: bool = False, progress: bool | None = None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
  """Trains `cfg` for train.steps updates (or until `stop_after`), checkpointing to `ckpt_dir`.

  resume: continue from the newest readable checkpoint in ckpt_dir (fresh start if none).
  stop_after: stop after this step with a checkpoint; the schedule still spans train.steps.
  metrics_path: JSONL file, one object per logged step (appended to on resume); process 0 writes.
  plot_path: PNG of the loss curve and per-expert load (default: metrics_path with .png).
  on_step(step, metrics): called on every process after each update (tests kill the process here).
  Raises NonFiniteLossError (last good checkpoint kept) on a non-finite loss or gradient.
  """
  # ---- setup: mesh, data, state (fresh or restored)
  tc = cfg.train
  t_start = time.time()
  is_main = jax.process_index() == 0
  say = printer(quiet or not is_main)
  mesh = mesh or shd.make_mesh(cfg.mesh)
  shd.validate_mesh(cfg, mesh, tc.batch_size)
  dataset = TokenDataset.from_path(data_path, val_fraction=tc.val_fraction, seq_len=cfg.model.seq_len,
                                   vocab_size=cfg.model.vocab_size, encode_text=text_encoder(ckpt_dir))
  tx = make_optimizer(tc)
  graphdef, abstract, shardings = state_layout(cfg, mesh, tx)
  batch_sh = shd.batch_sharding(mesh)
  ckpt = Checkpointer(ckpt_dir, keep=tc.keep_checkpoints) if ckpt_dir else None
  last_ckpt: int | None = None
  state = None
  if ckpt is not None and resume:
    found = ckpt.newest_meta()
    if found is not None and not holds_optimizer_state(found[1]):   # imported weights: a fresh optimizer
      # A reader of its own: Orbax binds an item to the handler of its first use, and this writer saves whole states.
      reader = Checkpointer(ckpt_dir, read_only=True)
      try:
        restored = reader.restore({k: abstract[k] for k in ('params', 'extra', 'step', 'rng')}, partial=True)
      finally:
        reader.close()
      opt = init_opt_state(cfg, mesh, tx, shardings, restored.state['params'])
      restored = dataclasses.replace(restored, state={**restored.state, 'opt': opt})
    else:
      restored = ckpt.restore(abstract)
    if restored is not None:
      state, last_ckpt = restored.state, restored.step
      say(f'resumed from {ckpt.directory}/{restored.step} (step {int(restored.meta["step"])}) '
          f'onto a {dict(mesh.shape)} mesh')
  if state is None:
    if ckpt is not None and not resume and ckpt.latest_step() is not None:
      ckpt.close()
      raise FileExistsError(f'{ckpt.directory} already holds checkpoints (latest step {ckpt.latest_step()}); '
                            'pass --resume to continue that run or choose another --ckpt-dir')
    state = init_state(cfg, mesh, tx, shardings)
  start = int(jax.device_get(state['step']))
  stop = min(tc.steps, stop_after) if stop_after is not None else tc.steps

  # ---- steps: jitted update and eval, batches, checkpoint saves
  step_fn = make_train_step(cfg, graphdef, tx, shardings, batch_sh)
  eval_fn = make_eval_step(cfg, graphdef, shardings, batch_sh)
  pid, pcount = jax.process_index(), jax.process_count()

  def get_batch(step: int, split: str = 'train'):
    x, y = dataset.batch(step, tc.batch_size, cfg.model.seq_len, split=split, seed=tc.seed,
                         process_index=pid, process_count=pcount)
    return global_batch_to_device(x, y, batch_sh)

  def evaluate(state) -> float:
    # The same val batches every time, so successive val losses are comparable. Under the mesh
    # also after the loop: the MoE layers choose their dispatch from it.
    with jax.set_mesh(mesh):
      losses = [eval_fn(state, *get_batch(i, 'val')) for i in range(tc.eval_batches)]
    return float(np.mean(jax.device_get(losses)))

  def save(state, step: int) -> None:
    nonlocal last_ckpt
    if ckpt is None or last_ckpt == step:
      return
    if not bool(all_finite(state)):   # never let a bad state replace a good checkpoint
      raise NonFiniteLossError(step, last_ckpt, str(ckpt.directory))
    ckpt.save(step, state, {'config': cfg.to_dict(), 'data': {'seed': tc.seed, 'next_batch': step},
                            'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'process_count': pcount})
    last_ckpt = step

  # ---- the loop: step, log, eval, checkpoint; a signal stops it with a checkpoint
  tokens_per_step = tc.batch_size * cfg.model.seq_len
  n_batch_ranks = shd.mesh_sizes(mesh)['data'] * shd.mesh_sizes(mesh)['expert']
  # analytic, with capacity padding at this N (litejax.model.bounds)
  flops_per_token = bounds.train_flops_per_token(cfg, tokens_per_step // n_batch_ranks)
  peak = peak_flops_per_device(jax.devices()[0])
  writer = MetricsWriter(metrics_path, keep_until=start if resume else None) if (metrics_path and is_main) else None
  history: list[dict[str, Any]] = []
  status, val_loss = 'done', None
  say(f'training {stop - start} steps ({start} -> {stop} of {tc.steps}) on {len(mesh.devices.flat)} '
      f'{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}, {tokens_per_step} tokens/step, '
      f'corpus {dataset.source} ({len(dataset):,} tokens)')
  say(sparse_train.describe(cfg, mesh))

  bar = Progress(stop, start, enabled=is_main and not quiet, live=progress)
  window_t, window_steps, compiled = time.time(), 0, start == stop
  try:
    with _StopFlag() as flag, jax.set_mesh(mesh), bar:
      batch = get_batch(start) if start < stop else None
      for step_idx in range(start, stop):
        step = step_idx + 1
        state, m = step_fn(state, *batch)
        if step < stop:
          batch = get_batch(step)        # host work overlaps the device computing this step
        m = jax.device_get(m)
        if not bool(m['finite']):
          raise NonFiniteLossError(step, last_ckpt, str(ckpt.directory) if ckpt else None)
        if not compiled:                 # the first step includes compilation: keep it out of tokens/s
          compiled, window_t, window_steps = True, time.time(), 0
        else:
          window_steps += 1
        record = None
        if step % tc.log_every == 0 or step % tc.eval_every == 0 or step == stop:
          now = time.time()
          tps = window_steps * tokens_per_step / (now - window_t) if window_steps else None
          window_t, window_steps = now, 0
          record = make_record(step, m, tps, flops_per_token, peak, len(mesh.devices.flat))
        if step % tc.eval_every == 0 or step == tc.steps:
          val_loss = evaluate(state)
          record['val_loss'] = val_loss
          say(f'step {step}: loss {record["loss"]:.4f}  val_loss {val_loss:.4f}  '
              f'drop {record["drop_fraction"]:.3f}', live=bar)
        if record is not None:
          history.append(record)
          if writer:
            writer.write(record)
          bar.update(step, record)
        if step % tc.ckpt_every == 0:
          save(state, step)
        elif ckpt is not None:
          ckpt.poll()                    # a finished background save gets its digest: complete to readers
        if on_step is not None:
          on_step(step, m)
        if flag.signal is not None and step < stop:
          status = 'interrupted'
          save(state, step)
          say(f'{signal.Signals(flag.signal).name} at step {step}: checkpoint saved, exiting '
              '(continue with --resume)', live=bar)
          break
      else:
        if stop > start:
          save(state, stop)
        if stop < tc.steps:
          status = 'stopped'
  finally:
    if ckpt is not None:
      ckpt.close()
    if writer:
      writer.close()
  # ---- end of run: final eval, plot
  final_step = int(jax.device_get(state['step']))
  if val_loss is None and status == 'done':
    val_loss = evaluate(state)
  if is_main and (plot_path or metrics_path) and history:
    out = pathlib.Path(plot_path) if plot_path else pathlib.Path(metrics_path).with_suffix('.png')
    plot_metrics(_read_history(metrics_path, history) if metrics_path else history, out, cfg)
    say(f'plot: {out}')
  seconds = time.time() - t_start
  say(f'{status} at step {final_step} in {seconds:.1f}s' +
      (f'; val_loss {val_loss:.4f} nats/token' if val_loss is not None else ''))
  return TrainResult(status=status, step=final_step, val_loss=val_loss, history=history, seconds=seconds)


def _read_history(metrics_path, fallback):
  try:
    return [json.loads(line) for line in pathlib.Path(metrics_path).read_text().splitlines() if line.strip()]
  except (OSError, ValueError):
    return fallback
