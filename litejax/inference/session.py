"""A checkpoint loaded for decoding: config from the checkpoint, parameters onto the current mesh, and
`generate` with a runtime sized to the prompts (litejax.inference.decode) and the latency model's split.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from typing import Any

import jax

from litejax.inference import decode
from litejax import sharding as shd
from litejax.config import Config, from_dict, parse_overrides
from litejax.inference.sampling import Sampling


@dataclasses.dataclass
class Session:
  cfg: Config
  mesh: Any
  params: Any
  extra: Any
  step: int
  runtime: decode.Runtime | None = None

  def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0) -> decode.Generation:
    """Generates for a batch of token prompts (the runtime is built, or rebuilt, for their batch and length)."""
    s = shd.mesh_sizes(self.mesh)
    ranks = s['data'] * s['expert']
    batch = math.ceil(len(prompts) / ranks) * ranks
    max_len = max(len(p) for p in prompts) + max_new_tokens
    rt = self.runtime
    if rt is None or rt.batch != batch or rt.max_len != max_len:
      rt = self.runtime = decode.make_runtime(self.cfg, self.mesh, batch, max_len)
    with jax.set_mesh(self.mesh):
      return decode.generate(rt, self.params, self.extra, prompts, max_new_tokens, sampling, seed)


def load(ckpt_dir: str | pathlib.Path, overrides: list[str] = (), devices=None) -> Session:
  """Reads the config stored with the newest checkpoint (plus `overrides`, e.g. mesh.*) and restores
  its parameters onto that config's mesh over `devices` (default all). FileNotFoundError when ckpt_dir holds no checkpoint."""
  from litejax.train import loop as train_lib, step as train_step
  stored = train_lib.restore_config(ckpt_dir)
  if stored is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_dir}: run `litejax train` first (or pass --ckpt-dir)')
  cfg = from_dict(parse_overrides(overrides), base=stored) if overrides else stored
  mesh = shd.make_mesh(cfg.mesh, devices)
  _, abstract, _ = train_step.state_layout(cfg, mesh)
  restored = restore_params(ckpt_dir, {'params': abstract['params'], 'extra': abstract['extra']})
  if restored is None:
    raise FileNotFoundError(f'no readable checkpoint in {ckpt_dir}: run `litejax train` first')
  step, state = restored
  return Session(cfg, mesh, state['params'], state['extra'], step)


def restore_params(ckpt_dir, abstract: dict) -> tuple[int, dict] | None:
  """(step, {'params', 'extra'}) of the newest intact checkpoint, restored into `abstract`'s
  shardings by an Orbax partial restore: the optimizer state (dense AdamW moments or the sparse
  update's rows) is never read. The checks of Checkpointer.restore, on these leaves: each candidate's
  digest, then its stored shapes against `abstract` (CheckpointMismatchError naming the leaf); an
  unreadable checkpoint is skipped with a warning for the previous one. None: no checkpoint."""
  import orbax.checkpoint as ocp

  from litejax.train.checkpoint import (Checkpointer, CheckpointCorruptError, CheckpointMismatchError, leaf_specs)
  ckpt = Checkpointer(ckpt_dir)
  skipped = []
  try:
    ckpt.manager.reload()
    for s in reversed(ckpt.all_steps()):
      where = f'checkpoint {ckpt_dir}/{s}'
      try:
        ckpt.verify(s)
        saved = ckpt.read_meta(s).get('leaves', {})
        for name, spec in leaf_specs(abstract).items():
          if list(saved.get(name, {}).get('shape', [None])) != list(spec['shape']):
            raise CheckpointMismatchError(f'{where}: {name} {tuple(spec["shape"])} of the config is '
                                          f'{saved.get(name, {}).get("shape", "missing")} in the checkpoint')
        args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
        return s, ckpt.manager.restore(s, args=ocp.args.Composite(state=args))['state']
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 (any read failure means: not a usable checkpoint)
        warnings.warn(f'{where}: unreadable ({type(e).__name__}: {e}); trying the previous one', RuntimeWarning,
                      stacklevel=2)
        skipped.append(where)
  finally:
    ckpt.close()
  if skipped:
    raise CheckpointCorruptError(f'no intact checkpoint in {ckpt_dir}: ' + '; '.join(skipped))
  return None
