"""The profile behind docs/performance.md's "Profile": times the MoE layer's pieces under jit at one E.

    python experiments/profile_moe.py                  # E = 1024, 1,024 tokens, d = 128, h = 256, K = 2
    python experiments/profile_moe.py --experts 256 --json

Rows (median ms of --repeats runs after a warm-up):
  top_k_argmax / top_k_sort / lax_top_k: top-2 of the [N, E] router scores: litejax's argmax rounds,
      the full stable sort it replaced, and lax.top_k (which the SPMD partitioner gathers in front of);
  route_fwd, layer_fwd: routing alone and the whole capacity-path layer forward;
  experts_fwd_bwd_einsum / experts_fwd_bwd_expert_matmul: the expert MLP on the [E, C, d] buffer,
      forward + backward, with plain batched einsums and with litejax's expert_matmul.
"""
from __future__ import annotations

import json
import statistics
import sys

import jax
import jax.numpy as jnp

import harness
from litejax.model.moe.capacity import capacity
from litejax.config import from_dict
from litejax.model.moe.dispatch import moe_ffn
from litejax.model.moe.rows import expert_matmul
from litejax.model.moe.routing import route, top_k


def median_ms(fn, *args, repeats: int) -> float:
  return statistics.median(harness.time_compiled(fn, args, repeats)[0]) * 1e3


def sort_top_k(x, k):
  """The full stable sort routing used before the argmax rounds."""
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  neg, idx = jax.lax.sort((-x, idx), dimension=x.ndim - 1, num_keys=1, is_stable=True)
  return -neg[..., :k], idx[..., :k]


def profile(E: int, N: int, d: int, h: int, K: int, repeats: int) -> dict[str, float]:
  cfg = from_dict({'moe': dict(experts_per_group=E, k_expert=K, d_expert=h, expert_kind='mlp',
                               dispatch='capacity')}).moe
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (N, d))
  router = {'expert': jax.random.normal(keys[1], (1, d, E)) * d ** -0.5}
  w = {'w_in': jax.random.normal(keys[2], (E, d, h)) * d ** -0.5,
       'w_out': jax.random.normal(keys[3], (E, h, d)) * h ** -0.5}
  scores = jax.nn.softmax(jax.random.normal(keys[4], (N, E)), axis=-1)
  x_ecd = jax.random.normal(keys[5], (E, capacity(cfg, N, E), d))

  def experts_loss(matmul):
    return jax.value_and_grad(lambda x, w: jnp.mean(jnp.square(
        matmul(jax.nn.relu(matmul(x, w['w_in'])), w['w_out']))), argnums=(0, 1))

  rows = {
      'top_k_argmax': (lambda s: top_k(s, K), scores),
      'top_k_sort': (lambda s: sort_top_k(s, K), scores),
      'lax_top_k': (lambda s: jax.lax.top_k(s, K), scores),
      'route_fwd': (lambda x, r: route(x, r, cfg), x, router),
      'layer_fwd': (lambda x, r, w: moe_ffn(x, route(x, r, cfg), w, cfg)[0], x, router, w),
      'experts_fwd_bwd_einsum': (experts_loss(lambda a, b: jnp.einsum('eca,eab->ecb', a, b)), x_ecd, w),
      'experts_fwd_bwd_expert_matmul': (experts_loss(expert_matmul), x_ecd, w),
  }
  return {name: median_ms(fn, *args, repeats=repeats) for name, (fn, *args) in rows.items()}


def main(argv=None) -> int:
  p = harness.parser(__doc__, out='none', repeats=7)
  p.add_argument('--experts', type=int, default=1024)
  p.add_argument('--tokens', type=int, default=1024)
  harness.add_layer_shape(p)
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)
  out = profile(args.experts, args.tokens, args.d_model, args.d_expert, args.k, args.repeats)
  if args.json:
    print(json.dumps(out, indent=1))
  else:
    for name, ms in out.items():
      print(f'{name:32s} {ms:9.2f} ms')
  return 0


if __name__ == '__main__':
  sys.exit(main())
