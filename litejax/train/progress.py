"""What a training run shows and records: the progress bar or log lines, `say` messages, and the
metrics.jsonl record of a logged step (in-graph metrics, the writer and the plot: litejax.train.metrics); and
`count_bar`, the bar of other long loops (eval's windows, an import's tensors)."""
from __future__ import annotations

import sys
from typing import Any

import numpy as np


def make_record(step: int, m: dict[str, Any], tps: float | None, flops_per_token: float,
                peak: float | None, num_devices: int) -> dict[str, Any]:
  """The metrics.jsonl record of one logged step, from the step's metrics on the host."""
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
      **{k: float(m[k]) for k in ('tier_load_entropy', 'group_load_entropy') if k in m},
      'tokens_per_second': tps,
      'mfu': (tps * flops_per_token / (peak * num_devices)) if (tps and peak) else None,
  }
  if tpe.size and tpe.shape[1] <= 256:
    # Load fraction per expert, per MoE layer (small expert counts only: it is per logged step).
    rec['expert_load'] = (tpe / np.maximum(tpe.sum(axis=1, keepdims=True), 1)).round(5).tolist()
  return rec


class Progress:
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


def printer(quiet: bool):
  """A `say(text, live=bar)` that prints to stderr above the progress bar (nothing when quiet)."""
  if quiet:
    return lambda *a, **k: None

  def say(text: str, live: Progress | None = None) -> None:
    if live is not None and live.enabled:
      live.print(text)
    else:
      print(text, file=sys.stderr, flush=True)
  return say


class count_bar:
  """`with count_bar('eval', enabled) as progress:` a rich bar on stderr when it is a terminal, drawn from the
  first progress(done, total) call; progress is None otherwise (nothing is printed)."""

  def __init__(self, label: str, enabled: bool = True):
    from rich.console import Console
    self.label, self.console = label, Console(stderr=True)
    self.enabled = enabled and self.console.is_terminal
    self.bar = None

  def __enter__(self):
    return self if self.enabled else None

  def __call__(self, done: int, total: int) -> None:
    if self.bar is None:
      from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
      self.bar = Progress(TextColumn(f'[bold]{self.label}'), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=self.console, transient=True)
      self.bar.start()
      self.task = self.bar.add_task(self.label, total=total)
    self.bar.update(self.task, completed=done)

  def __exit__(self, *exc):
    if self.bar is not None:
      self.bar.stop()
