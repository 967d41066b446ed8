"""Training: a plain jitted `train_step` on functional NNX state, and the loop around it.

The model is split once into a static `graphdef` and array state; the train state is a plain dict

  {'params': nnx.State (Param), 'extra': nnx.State (router selection biases, ...),
   'opt': optax state, 'step': int32 [] (updates done = next batch index), 'rng': uint32 key data}

so one jitted function `(state, inputs, targets) -> (state, metrics)` does a whole update, with the
state donated and explicit in/out shardings from litejax.sharding. Batches are a pure function of
(train.seed, step), so `step` alone is the data position and a resumed run replays exactly.

Loss = cross-entropy + moe.aux_loss_weight · Σ_levels load_balance_loss + moe.z_loss_weight · z_loss.
Logged `loss` and `val_loss` are the cross-entropy alone (nats per token; per byte for the byte
tokenizer), so MoE and dense runs compare directly.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from litejax import bounds
from litejax import sharding as shd
from litejax.checkpoint import Checkpointer
from litejax.config import Config, TrainConfig, from_dict
from litejax.data import TokenDataset, global_batch_to_device
from litejax.metrics import MetricsWriter, expert_load_entropy, plot_metrics


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


# ---------------------------------------------------------------------------- optimizer

def lr_schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to train.lr, then cosine decay to lr·min_lr_ratio at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; weight decay only on matrices (not norm scales)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  adamw = optax.adamw(lr_schedule(tc), b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay,
                      mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip > 0 else adamw


# ---------------------------------------------------------------------------- state

def _new_state(cfg: Config, tx: optax.GradientTransformation) -> dict[str, Any]:
  from litejax.model import Transformer
  model = Transformer(cfg, nnx.Rngs(params=cfg.train.seed))
  _, params, extra = nnx.split(model, nnx.Param, ...)
  return {
      'params': params, 'extra': extra, 'opt': tx.init(params),
      'step': jnp.zeros((), jnp.int32),
      # No layer draws randomness today; the key is carried (and checkpointed) so one that does
      # (dropout, noisy routing) resumes bit-exactly.
      'rng': jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
  }


def state_layout(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation):
  """(graphdef, abstract state with shardings attached, shardings pytree) for the current mesh.

  Nothing is allocated: this is also the restore target for checkpoints written on any mesh.
  """
  from litejax.model import Transformer
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0))), nnx.Param, ...)[0]
  abstract = jax.eval_shape(lambda: _new_state(cfg, tx))
  replicated = NamedSharding(mesh, P())
  params_sh = shd.state_shardings(abstract['params'], mesh)
  shardings = {
      'params': params_sh,
      'extra': shd.state_shardings(abstract['extra'], mesh),
      'opt': shd.tree_shardings_like(abstract['opt'], params_sh),
      'step': replicated,
      'rng': replicated,
  }
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract, shardings


def init_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, shardings: Any) -> dict[str, Any]:
  """A fresh train state, each array created directly in its sharding (no host copy)."""
  return jax.jit(lambda: _new_state(cfg, tx), out_shardings=shardings)()


# ---------------------------------------------------------------------------- steps

def _forward(graphdef, params, extra, inputs_bs, targets_bs, cfg: Config, expert_fn):
  model = nnx.merge(graphdef, params, extra)
  logits_bsv, aux = model(inputs_bs, expert_fn=expert_fn)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_bsv, targets_bs).mean()
  return ce, aux


def make_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation, shardings: Any,
                    batch_sharding: NamedSharding, expert_fn: Callable | None = None):
  """The jitted update `(state, inputs [B,S], targets [B,S]) -> (state, metrics)`; state is donated."""
  m = cfg.moe

  def loss_fn(params, extra, inputs_bs, targets_bs):
    ce, aux = _forward(graphdef, params, extra, inputs_bs, targets_bs, cfg, expert_fn)
    aux_loss = jnp.sum(aux['load_balance_loss'])
    loss = ce + m.aux_loss_weight * aux_loss + m.z_loss_weight * aux['z_loss']
    return loss, (ce, aux_loss, aux)

  def train_step(state, inputs_bs, targets_bs):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (ce, aux_loss, aux)), grads = grad_fn(state['params'], state['extra'], inputs_bs, targets_bs)
    with jax.named_scope('optimizer'):   # names the update's work and bytes for litejax.cost
      updates, opt = tx.update(grads, state['opt'], state['params'])
      params = optax.apply_updates(state['params'], updates)
    extra = state['extra']
    tokens_le = aux['tokens_per_expert']                       # [moe layers, E] assignments
    if m.bias_update_rate > 0 and tokens_le.shape[0]:
      extra = _update_bias(graphdef, params, extra, tokens_le, cfg)
    grad_norm = optax.tree.norm(grads)
    metrics = {
        'loss': ce, 'total_loss': total, 'aux_loss': aux_loss, 'z_loss': aux['z_loss'],
        'drop_fraction': aux['drop_fraction'][2],              # expert level: assignments dropped
        'drop_fraction_levels': aux['drop_fraction'],
        'grad_norm': grad_norm,
        'expert_load_entropy': expert_load_entropy(tokens_le),
        'tokens_per_expert': tokens_le,
        'finite': jnp.isfinite(total) & jnp.isfinite(grad_norm),
    }
    state = dict(state, params=params, extra=extra, opt=opt, step=state['step'] + 1)
    return state, metrics

  return jax.jit(train_step, in_shardings=(shardings, batch_sharding, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=(0,))


def _update_bias(graphdef, params, extra, tokens_le, cfg: Config):
  """Loss-free balancing: each MoE block nudges its expert selection bias toward uniform load."""
  model = nnx.merge(graphdef, params, extra)
  blocks = model.moe_blocks()
  rate = cfg.moe.bias_update_rate
  if cfg.model.scan_layers:
    # One stacked block: its bias is [periods, E], matching tokens_le row for row.
    from litejax import routing
    blk = blocks[0]
    if hasattr(blk, 'bias_expert'):
      blk.bias_expert[...] = jax.vmap(routing.update_selection_bias, in_axes=(0, 0, None))(
          blk.bias_expert[...], tokens_le, rate)
  else:
    for i, blk in enumerate(blocks):
      blk.update_bias(tokens_le[i], rate)
  return nnx.split(model, nnx.Param, ...)[2]


def make_eval_step(cfg: Config, graphdef, shardings: Any, batch_sharding: NamedSharding,
                   expert_fn: Callable | None = None):
  """Jitted `(state, inputs, targets) -> mean cross-entropy` (no state change)."""
  def eval_step(state, inputs_bs, targets_bs):
    ce, _ = _forward(graphdef, state['params'], state['extra'], inputs_bs, targets_bs, cfg, expert_fn)
    return ce

  return jax.jit(eval_step, in_shardings=(shardings, batch_sharding, batch_sharding), out_shardings=None)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


# ---------------------------------------------------------------------------- loop helpers

def peak_flops_per_device(device: Any) -> float | None:
  """Dense bf16 peak of one device (litejax.hardware), or None (CPU, unknown chips)."""
  from litejax.hardware import peak_flops_for_device_kind
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


def restore_config(ckpt_dir: str | pathlib.Path) -> Config | None:
  """The config stored in the newest checkpoint of `ckpt_dir` (None if there is none)."""
  ckpt = Checkpointer(ckpt_dir)
  try:
    step = ckpt.latest_step()
    return None if step is None else from_dict(ckpt.read_meta(step)['config'])
  finally:
    ckpt.close()


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
  tc = cfg.train
  t_start = time.time()
  is_main = jax.process_index() == 0
  say = _printer(quiet or not is_main)
  mesh = mesh or shd.make_mesh(cfg.mesh)
  shd.validate_mesh(cfg, mesh, tc.batch_size)
  dataset = TokenDataset.from_path(data_path, val_fraction=tc.val_fraction, seq_len=cfg.model.seq_len,
                                   vocab_size=cfg.model.vocab_size)
  tx = make_optimizer(tc)
  graphdef, abstract, shardings = state_layout(cfg, mesh, tx)
  batch_sh = shd.batch_sharding(mesh)
  expert_fn = shd.make_expert_fn(mesh, cfg)
  ckpt = Checkpointer(ckpt_dir, keep=tc.keep_checkpoints) if ckpt_dir else None
  last_ckpt: int | None = None
  state = None
  if ckpt is not None and resume:
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

  step_fn = make_train_step(cfg, graphdef, tx, shardings, batch_sh, expert_fn)
  eval_fn = make_eval_step(cfg, graphdef, shardings, batch_sh, expert_fn)
  pid, pcount = jax.process_index(), jax.process_count()

  def get_batch(step: int, split: str = 'train'):
    x, y = dataset.batch(step, tc.batch_size, cfg.model.seq_len, split=split, seed=tc.seed,
                         process_index=pid, process_count=pcount)
    return global_batch_to_device(x, y, batch_sh)

  def evaluate(state) -> float:
    # The same val batches every time, so successive val losses are comparable.
    losses = [eval_fn(state, *get_batch(i, 'val')) for i in range(tc.eval_batches)]
    return float(np.mean(jax.device_get(losses)))

  def save(state, step: int) -> None:
    nonlocal last_ckpt
    if ckpt is None or last_ckpt == step:
      return
    if not bool(_all_finite(state)):   # never let a bad state replace a good checkpoint
      raise NonFiniteLossError(step, last_ckpt, str(ckpt.directory))
    ckpt.save(step, state, {'config': cfg.to_dict(), 'data': {'seed': tc.seed, 'next_batch': step},
                            'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'process_count': pcount})
    last_ckpt = step

  tokens_per_step = tc.batch_size * cfg.model.seq_len
  n_batch_ranks = shd.mesh_sizes(mesh)['data'] * shd.mesh_sizes(mesh)['expert']
  # analytic, with capacity padding at this N (litejax.bounds)
  flops_per_token = bounds.train_flops_per_token(cfg, tokens_per_step // n_batch_ranks)
  peak = peak_flops_per_device(jax.devices()[0])
  writer = MetricsWriter(metrics_path, keep_until=start if resume else None) if (metrics_path and is_main) else None
  history: list[dict[str, Any]] = []
  status, val_loss = 'done', None
  say(f'training {stop - start} steps ({start} -> {stop} of {tc.steps}) on {len(mesh.devices.flat)} '
      f'{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}, {tokens_per_step} tokens/step, '
      f'corpus {dataset.source} ({len(dataset):,} tokens)')

  bar = _Progress(stop, start, enabled=is_main and not quiet, live=progress)
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
          record = _record(step, m, tps, flops_per_token, peak, len(mesh.devices.flat))
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


def _record(step: int, m: dict[str, Any], tps: float | None, flops_per_token: float,
            peak: float | None, num_devices: int) -> dict[str, Any]:
  tpe = np.asarray(m['tokens_per_expert'], np.float64)
  rec = {
      'step': step,
      'loss': float(m['loss']),
      'total_loss': float(m['total_loss']),
      'aux_loss': float(m['aux_loss']),
      'z_loss': float(m['z_loss']),
      'drop_fraction': float(m['drop_fraction']),
      'grad_norm': float(m['grad_norm']),
      'expert_load_entropy': float(m['expert_load_entropy']) if tpe.size else None,
      'tokens_per_second': tps,
      'mfu': (tps * flops_per_token / (peak * num_devices)) if (tps and peak) else None,
  }
  if tpe.size and tpe.shape[1] <= 256:
    # Load fraction per expert, per MoE layer (small expert counts only: it is per logged step).
    rec['expert_load'] = (tpe / np.maximum(tpe.sum(axis=1, keepdims=True), 1)).round(5).tolist()
  return rec


def _read_history(metrics_path, fallback):
  try:
    return [json.loads(line) for line in pathlib.Path(metrics_path).read_text().splitlines() if line.strip()]
  except (OSError, ValueError):
    return fallback


class _Progress:
  """A rich progress bar on a terminal (step, loss, tokens/s, drop rate); plain log lines otherwise."""

  def __init__(self, total: int, start: int, enabled: bool, live: bool | None):
    self.enabled = enabled
    self.total, self.start = total, start
    self.progress = None
    if enabled:
      from rich.console import Console
      console = Console(stderr=True)
      self.live = console.is_terminal if live is None else live
      if self.live:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.progress = Progress(TextColumn('[bold]train'), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn('{task.fields[info]}'), console=console)
        self.task = self.progress.add_task('train', total=total, completed=start, info='compiling...')

  def __enter__(self):
    if self.progress is not None:
      self.progress.__enter__()
    return self

  def __exit__(self, *exc):
    if self.progress is not None:
      self.progress.__exit__(*exc)

  def print(self, text: str) -> None:
    if self.progress is not None:
      self.progress.console.print(text)
    else:
      print(text, file=sys.stderr, flush=True)

  def update(self, step: int, rec: dict[str, Any]) -> None:
    if not self.enabled:
      return
    tps = rec.get('tokens_per_second')
    info = (f'loss {rec["loss"]:.4f}  ' + (f'{tps:,.0f} tok/s  ' if tps else '') +
            f'drop {rec["drop_fraction"]:.3f}' + (f'  mfu {rec["mfu"]:.1%}' if rec.get('mfu') else ''))
    if self.progress is not None:
      self.progress.update(self.task, completed=step, info=info)
    else:
      print(f'step {step}/{self.total}  {info}', file=sys.stderr, flush=True)


def _printer(quiet: bool):
  """A `say(text, live=bar)` that prints to stderr above the progress bar (nothing when quiet)."""
  if quiet:
    return lambda *a, **k: None

  def say(text: str, live: _Progress | None = None) -> None:
    if live is not None and live.enabled:
      live.print(text)
    else:
      print(text, file=sys.stderr, flush=True)
  return say
