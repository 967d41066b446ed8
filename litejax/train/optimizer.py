"""The optimizer of the dense parameters: AdamW with linear warmup and cosine decay (one builder for
both expert updates; the row optimizers of sparse expert tables are litejax.train.row_optim)."""
from __future__ import annotations

import jax
import optax

from litejax.config import TrainConfig


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to train.lr, then cosine decay to lr·min_lr_ratio at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig, *, clip: bool = True) -> optax.GradientTransformation:
  """AdamW with train.lr's schedule; weight decay only on matrices (not norm scales). clip: global-norm
  clipping at train.grad_clip first (0 = none). The sparse step passes clip=False: it clips its dense and
  row gradients together with one factor (litejax.train.sparse_step)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  adamw = optax.adamw(lr_schedule(tc), b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay,
                      mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if clip and tc.grad_clip > 0 else adamw
