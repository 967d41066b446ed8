"""A checkpoint loaded for decoding: config from the checkpoint, parameters onto the current mesh, and
`generate` with a runtime sized to the prompts (litejax.inference.decode) and the latency model's split.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
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
  its parameters onto that config's mesh over `devices` (default all): params and extra alone, by the
  checkpoint reader's partial restore (the optimizer state is never read), from the newest intact
  checkpoint. FileNotFoundError when ckpt_dir holds no checkpoint."""
  from litejax.train import step as train_step
  from litejax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(ckpt_dir, read_only=True)
  try:
    found = ckpt.newest_meta()
    if found is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt_dir}: run `litejax train` first (or pass --ckpt-dir)')
    stored = from_dict(found[1]['config'])
    cfg = from_dict(parse_overrides(overrides), base=stored) if overrides else stored
    mesh = shd.make_mesh(cfg.mesh, devices)
    _, abstract, _ = train_step.state_layout(cfg, mesh)
    restored = ckpt.restore({'params': abstract['params'], 'extra': abstract['extra']}, partial=True)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no readable checkpoint in {ckpt_dir}: run `litejax train` first')
  return Session(cfg, mesh, restored.state['params'], restored.state['extra'], restored.step)
