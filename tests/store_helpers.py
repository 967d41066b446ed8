"""Shared by the expert-store tests: a shrunk configs/store_1b.yaml (same structure: hierarchical
routing, glu experts, every layer MoE) and a TensorStore byte counter."""
import tensorstore as ts

from litejax.config import load_config

STORE_1B = 'configs/store_1b.yaml'
# 2 layers x (2 tiers x 2 groups x 4 experts) of d=16, h=8: 16 experts per layer of 1,536 B.
SMALL = ['model.d_model=16', 'model.num_heads=2', 'model.num_kv_heads=1', 'model.num_layers=2',
         'moe.num_tiers=2', 'moe.groups_per_tier=2', 'moe.experts_per_group=4', 'moe.k_tier=1', 'moe.k_group=1',
         'moe.k_expert=2', 'moe.d_expert=8']


def small_cfg(*extra):
  return load_config(STORE_1B, SMALL + list(extra))


def bytes_read(driver: str = 'file') -> int:
  """Bytes TensorStore's `driver` kvstore has read in this process so far (its own counter)."""
  for m in ts.experimental_collect_matching_metrics(f'/tensorstore/kvstore/{driver}/bytes_read'):
    return int(sum(v.get('value', 0) for v in m['values']))
  return 0


def write_model_store(cfg, model, location):
  """The model's routed experts, written to a store (unscanned model)."""
  import numpy as np

  from litejax.inference.store import layout
  from litejax.inference.store.writer import StoreWriter
  w = StoreWriter(str(location), cfg, overwrite=True)
  for layer, name, _, _ in layout.expert_leaves(cfg):
    w.write(layer, 0, {name: np.asarray(getattr(model.blocks[layer].ffn, name)[...])})
  return w.finish({'test': True})


def resident(cfg, model, prompts, new):
  """Tokens [B, new] and logits per step [new][B, V] of the resident decode step (litejax.inference.decode),
  greedy, one row per prompt."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from litejax import sharding as shd
  from litejax.config import MeshConfig
  from litejax.inference import decode
  from litejax.inference.sampling import Sampling
  from litejax.model import kv_cache
  _, params, extra = nnx.split(model, nnx.Param, ...)
  mesh = shd.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  max_len = max(len(p) for p in prompts) + new
  rt = decode.make_runtime(cfg, mesh, len(prompts), max_len)
  with jax.set_mesh(mesh):
    params, extra = rt.place(params, extra)
    tokens, lengths = decode.pad_prompts(prompts, len(prompts))
    key, samp = rt.replicated((jax.random.key(0), Sampling().as_arrays()))
    cache = kv_cache.init_cache(cfg, mesh, len(prompts), max_len)
    nb, lp, cache = rt.prefill(params, extra, cache, tokens, rt.rows(lengths), key, samp)
    logits, toks = [np.asarray(lp)[np.arange(len(prompts)), lengths - 1]], [np.asarray(nb)]
    for j in range(new - 1):
      nb, lb, cache = rt.step(params, extra, cache, nb, rt.rows(lengths + j), key,
                              rt.replicated(jnp.int32(j + 1)), samp)
      logits.append(np.asarray(lb))
      toks.append(np.asarray(nb))
  return np.stack(toks, 1), logits
