"""The active-bounded train step: expert (and gathered router) tables updated on the rows a step touches.

With `train.expert_update` resolved to sparse (`config.resolve_expert_update`), the `RowParam` tables
(litejax.model.moe.block) are held out of differentiation. Each MoE block gets zero `RowDelta` perturbations
[u, ...] of its touched rows (`attach_row_deltas`, u from `row_bounds`); the forward reads
table[ids] + delta and returns the ids in `MoEStats.touched`, and the gradient with respect to the
deltas is the touched rows' gradient (litejax.model.moe.row_grad). Nothing of a table's size is formed in the
backward, and the row optimizer (litejax.train.row_optim) updates the touched rows in place on the
donated state. Dense parameters keep optax AdamW (without its own clip): one global norm over dense
gradients and row gradients, one clip for both, the learning rate `lr_schedule(step)` for both.

The train state is train_step's, with `opt` = {'dense': optax state of the non-row params,
'rows': {'blocks.1.ffn.w_in': RowAdamWState | RowFactoredState, ...}}; a row state shards like its
table (`sparse_optim.state_shardings`), so checkpoints restore onto any device count.

On a mesh every (data, expert) rank reports its own u touched local experts (ids repeat over data
ranks: the same expert fed from two data ranks), so the update first sums rows of equal id
(`sparse_grad.dedup_rows`) into min(E, R_b·u) rows.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from litejax import sharding as shd
from litejax.model.moe import router_parallel, row_grad as sparse_grad
from litejax.train import row_optim as sparse_optim
from litejax.config import Config, ConfigError
from litejax.model.moe.expert_parallel import touched_rows_per_rank
from litejax.model.transformer import Transformer
from litejax.model.moe.block import EXPERT_TABLES, RowDelta, RowParam
from litejax.train.objective import forward_loss, loss_terms, step_metrics, update_bias
from litejax.train.optimizer import lr_schedule, make_optimizer


# ---------------------------------------------------------------------------- the choice and the bounds

def resolve_expert_update(cfg: Config, tokens_per_rank: int) -> str:
  """'dense' or 'sparse': how the expert tables are updated (train.expert_update, `auto` resolved).

  tokens_per_rank is N, the tokens of one MoE call on one rank (local_batch · seq_len). A step touches at
  most N·K experts per rank, so while E <= N·K every expert is (nearly) touched anyway and the dense
  update costs no more than the sparse one; beyond, the sparse update follows the touched experts.
  A model without MoE layers is always dense; `factored` exists only on the sparse path, so it makes
  `auto` sparse.
  """
  t, m = cfg.train, cfg.moe
  if cfg.model.num_moe_layers == 0:
    return 'dense'
  if t.expert_update != 'auto':
    return t.expert_update
  if t.expert_optimizer == 'factored':
    return 'sparse'
  return 'sparse' if m.experts_total > tokens_per_rank * m.k_active else 'dense'


def tokens_per_rank(cfg: Config, mesh: Mesh | None, global_batch: int | None = None) -> int:
  """N: tokens of one MoE call on one rank (global batch · seq_len / (data · expert))."""
  sizes = shd.mesh_sizes(mesh) if mesh is not None else {'data': 1, 'expert': 1}
  batch = cfg.train.batch_size if global_batch is None else global_batch
  return batch * cfg.model.seq_len // (sizes['data'] * sizes['expert'])


def update_mode(cfg: Config, mesh: Mesh | None) -> str:
  """'dense' | 'sparse': train.expert_update resolved at this mesh's N (`config.resolve_expert_update`)."""
  return resolve_expert_update(cfg, tokens_per_rank(cfg, mesh))


def row_bounds(cfg: Config, global_tokens: int, sizes: dict[str, int]) -> dict[str, int]:
  """Rows of each RowDelta for a step of `global_tokens` tokens on a mesh of `sizes`.

  'experts': u = min(E, N·K) on one device; on a mesh R_b·u, u per (data, expert) rank
  (`expert_parallel.touched_rows_per_rank`). 'router_group' / 'router_expert': the kept parents of all
  tokens, min(T, N·k_tier) / min(T·G, N·k_tier·k_group) (routing is global), except a router_expert
  split by group (`router_split`): R_b·u, u per rank (`router_parallel.rows_per_rank`).
  """
  m = cfg.moe
  batch_ranks = sizes['data'] * sizes['expert']
  if math.prod(sizes.values()) == 1:
    experts = touched_rows_per_rank(m, global_tokens, 0)
  else:
    experts = batch_ranks * touched_rows_per_rank(m, global_tokens // batch_ranks, sizes['expert'])
  if router_split(cfg, sizes):
    groups = batch_ranks * router_parallel.rows_per_rank(m, global_tokens // batch_ranks, sizes['expert'])
  else:
    groups = sparse_grad.touched_bound(m.num_tiers * m.groups_per_tier, global_tokens * m.k_tier * m.k_group)
  return {'experts': experts,
          'router_group': sparse_grad.touched_bound(m.num_tiers, global_tokens * m.k_tier),
          'router_expert': groups}


def router_split(cfg: Config, sizes: dict[str, int]) -> bool:
  """Whether router_expert is a RowParam split by group over the expert ranks (litejax.model.moe.router_parallel):
  its rows then come per (data, expert) rank like the experts'."""
  return shd.router_expert_split(cfg.moe, sizes['expert'])


def describe(cfg: Config, mesh: Mesh) -> str:
  """One line for the start of a run: the expert update chosen and u (what the train loop prints)."""
  n = tokens_per_rank(cfg, mesh)
  mode = update_mode(cfg, mesh)
  e, nk = cfg.moe.experts_total, n * cfg.moe.k_active
  if cfg.model.num_moe_layers == 0:
    return 'expert update: dense (no MoE layers)'
  text = f'expert update: {mode} (train.expert_update={cfg.train.expert_update}; E = {e} experts/layer, N·K = {nk}'
  if mode == 'dense':
    return text + '; every row differentiated and updated each step)'
  u = row_bounds(cfg, cfg.train.batch_size * cfg.model.seq_len, shd.mesh_sizes(mesh))['experts']
  return text + f'; u = {u} touched expert rows per layer per step, {cfg.train.expert_optimizer} row optimizer)'


# ---------------------------------------------------------------------------- state

def _key(path) -> str:
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _variables(state: nnx.State) -> list[tuple[tuple[str, ...], nnx.Variable]]:
  """(path names, Variable) of every Variable of a State."""
  return [(tuple(_key([k]) for k in path), v)
          for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_var)]


def split_tables(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(tables: the RowParams, dense: every other Param)."""
  return nnx.split_state(params, RowParam, ...)


def _vmapped(fn, leading: int, in_axes):
  for _ in range(leading):
    fn = jax.vmap(fn, in_axes=in_axes)
  return fn


def init_opt(cfg: Config, params: nnx.State) -> dict[str, Any]:
  """{'dense': optax state of the non-row params, 'rows': row optimizer state per table key}."""
  tables, dense = split_tables(params)
  opt = sparse_optim.row_optimizer(cfg.train.expert_optimizer, cfg.train)
  rows = {'.'.join(path): _vmapped(opt.init, len(v.shape) - 3, 0)(v.get_value()) for path, v in _variables(tables)}
  return {'dense': make_optimizer(cfg.train, clip=False).init(dense), 'rows': rows}


def opt_shardings(abstract_opt: dict[str, Any], params_sh: nnx.State) -> dict[str, Any]:
  """Shardings of `init_opt`'s state: optax state mirrors its params, a row state shards like its table."""
  tables_sh, _ = split_tables(params_sh)
  by_key = {'.'.join(path): v.get_value() for path, v in _variables(tables_sh)}
  return {'dense': shd.tree_shardings_like(abstract_opt['dense'], params_sh),
          'rows': {k: sparse_optim.state_shardings(by_key[k], st) for k, st in abstract_opt['rows'].items()}}


# ---------------------------------------------------------------------------- the step

def delta_graph(cfg: Config, global_tokens: int, mesh: Mesh):
  """(graphdef of the model with RowDeltas attached, their abstract State, their shardings)."""
  sizes = shd.mesh_sizes(mesh)
  rows = row_bounds(cfg, global_tokens, sizes)

  def build():
    model = Transformer(cfg, nnx.Rngs(params=0))
    for block in model.moe_blocks():
      block.attach_row_deltas(rows, split_router=router_split(cfg, sizes))
    return model

  graphdef, deltas, _ = nnx.split(nnx.eval_shape(build), RowDelta, ...)
  return graphdef, deltas, shd.state_shardings(deltas, mesh)


def _moe_index(cfg: Config, prefix: tuple) -> Any:
  """Index of a block's layer in the stacked MoEStats: a scanned block is all of them."""
  if prefix[0] == 'periods':
    return slice(None)
  return sum(cfg.model.is_moe_layer(j) for j in range(int(prefix[1])))


def _table_spec(var: nnx.Variable) -> P:
  return shd.logical_to_spec(var.get_metadata()['logical_axes'], len(var.shape))


def _by_expert_rank(ids: jax.Array, grads: jax.Array, spec: P, num_rows: int, mesh: Mesh):
  """Expert rows on a mesh: [*lead, R_b·u] rows split over the batch ranks (global ids) -> rows split over
  the expert ranks, [*lead, R_e·u2] with *local* ids (padding E_loc), each expert once.

  A (data, expert) rank's rows are experts of its expert rank, so only the data ranks of one expert rank
  exchange rows (all_gather over 'data'), then sum rows of equal id: u2 = min(E_loc, R_data·u).
  """
  lead = ids.ndim - 1
  sizes = shd.mesh_sizes(mesh)
  e_loc = num_rows // sizes['expert']
  u2 = sparse_grad.touched_bound(e_loc, sizes['data'] * (ids.shape[-1] // (sizes['data'] * sizes['expert'])))
  none = (None,) * lead
  row_spec = tuple(spec)[lead + 1:]

  def body(ids_u, grads_u):
    if sizes['data'] > 1:
      ids_u = jax.lax.all_gather(ids_u, 'data', axis=lead, tiled=True)
      grads_u = jax.lax.all_gather(grads_u, 'data', axis=lead, tiled=True)
    local = jnp.where(ids_u < num_rows, ids_u - jax.lax.axis_index('expert') * e_loc, e_loc)
    if sizes['data'] == 1:   # one rank's ids are distinct already: nothing to sum
      return local, grads_u
    return _vmapped(lambda i, g: sparse_grad.dedup_rows(i, g, u2, e_loc), lead, 0)(local, grads_u)

  # After the all_gather every data rank of an expert rank holds the same rows; the type system still
  # counts them as varying over 'data', so the replication is asserted (check_vma off) rather than inferred.
  return jax.shard_map(body, mesh=mesh, in_specs=(P(*none, shd.BATCH_AXES), P(*none, shd.BATCH_AXES, *row_spec)),
                       out_specs=(P(*none, 'expert'), P(*none, 'expert', *row_spec)), check_vma=False)(ids, grads)


def _split_rows(cfg: Config, name: str, mesh: Mesh) -> bool:
  """Whether a table's rows (and its row gradients) are split over the expert ranks of `mesh`."""
  return name in EXPERT_TABLES or (name == 'router_expert' and router_split(cfg, shd.mesh_sizes(mesh)))


def touched_grads(cfg: Config, tables: nnx.State, g_deltas: nnx.State, touched: dict[str, jax.Array],
                  mesh: Mesh) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{table key: (ids [..., u], grads [..., u, ...])}: each touched row once, its gradients summed.

  Expert tables on a mesh, and router_expert split by group, come back split over the expert ranks with
  local ids (`_by_expert_rank`); the rest (one device, replicated router tables) with global ids, replicated.
  """
  g_flat = {path: v.get_value() for path, v in _variables(g_deltas)}
  on_mesh = math.prod(shd.mesh_sizes(mesh).values()) > 1
  out = {}
  for path, var in _variables(tables):
    name, prefix = path[-1], path[:-1]
    kind = 'experts' if name in EXPERT_TABLES else name
    ids = touched[kind][_moe_index(cfg, prefix)]
    grads = g_flat[prefix + ('delta_' + name,)]
    if on_mesh and _split_rows(cfg, name, mesh):
      ids, grads = _by_expert_rank(ids, grads, _table_spec(var), var.shape[-3], mesh)
    out['.'.join(path)] = (ids, grads)
  return out


def apply_rows(cfg: Config, tables: nnx.State, row_state: dict[str, Any],
               rows: dict[str, tuple[jax.Array, jax.Array]], lr: jax.Array, grad_scale: jax.Array, mesh: Mesh):
  """Row optimizer on every table: (tables, row_state) with only the touched rows changed; the row
  gradients are scaled by grad_scale (the global-norm clip factor) inside the update.

  Expert tables on a mesh update under shard_map, each device its own shard of rows in place (XLA's
  partitioner would otherwise gather the whole table for a scatter with replicated ids).
  """
  opt = sparse_optim.row_optimizer(cfg.train.expert_optimizer, cfg.train)
  on_mesh = math.prod(shd.mesh_sizes(mesh).values()) > 1
  if on_mesh and cfg.train.expert_optimizer == 'factored' and shd.mesh_sizes(mesh)['tensor'] > 1:
    raise ConfigError('train.expert_optimizer: factored is not yet supported with mesh.tensor > 1 '
                      '(its statistics average over the tensor-split hidden axis)')
  new_state = {}

  def update(path, var):
    k = '.'.join(_key([p]) for p in path)
    ids, grads = rows[k]
    table = var.get_value()
    fn = _vmapped(opt.update, table.ndim - 3, (0, 0, 0, 0, None, None))
    if on_mesh and _split_rows(cfg, path[-1].key, mesh):
      spec = _table_spec(var)
      state_spec = jax.tree.map(lambda s: s.spec, sparse_optim.state_shardings(NamedSharding(mesh, spec), row_state[k]))
      lead = table.ndim - 3
      # factored: v_row / v_col come from the tensor-split gradient; with tensor = 1 (required above)
      # they are whole, which the type system cannot infer.
      fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec, state_spec, P(*spec[:lead + 1]), spec, P(), P()),
                         out_specs=(spec, state_spec), check_vma=cfg.train.expert_optimizer != 'factored')
    new_table, new_state[k] = fn(table, row_state[k], ids, grads, lr, grad_scale)
    return var.replace(new_table)

  return jax.tree_util.tree_map_with_path(update, tables, is_leaf=_is_var), new_state


def make_sparse_train_step(cfg: Config, graphdef, shardings: Any, batch_sharding: NamedSharding):
  """The jitted sparse update `(state, inputs, targets) -> (state, metrics)`; state donated.

  The loss and the metrics are litejax.train.objective's, as the dense step's, so both paths report the
  same things.
  """
  mesh = batch_sharding.mesh
  dense_tx = make_optimizer(cfg.train, clip=False)
  schedule = lr_schedule(cfg.train)

  bits = sparse_grad.bits_view_for(mesh.devices.flat[0].platform)

  def train_step(state, inputs_bs, targets_bs):
    with sparse_grad.bits_view(bits):   # traced here: the tables' uint16 view on CPU only
      return _step(state, inputs_bs, targets_bs)

  def _step(state, inputs_bs, targets_bs):
    sgraph, deltas_abs, deltas_sh = delta_graph(cfg, math.prod(inputs_bs.shape), mesh)

    def loss_fn(dense, deltas, extra, tables):
      # Fresh Variables at this trace level (nnx.scan refuses ones from the outer trace); the tables
      # are constants here: only the deltas carry their gradient.
      # On CPU bf16 tables enter as their uint16 bits (the blocks read them back): XLA:CPU emulates bf16 and
      # would keep an f32 copy of every stacked table in the layer scan's state for the per-layer slice.
      tables = jax.tree.map(lambda t: sparse_grad.as_bits(jax.lax.stop_gradient(t)), tables)
      ce, stats = forward_loss(sgraph, nnx.merge_state(dense, tables, deltas), extra, inputs_bs, targets_bs)
      total, aux = loss_terms(cfg, ce, stats)
      return total, (ce, aux, stats)

    deltas = jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(jnp.zeros(a.shape, a.dtype), s),
                          deltas_abs, deltas_sh)
    tables, dense = split_tables(state['params'])
    # Differentiated w.r.t. extra too (gradient dropped), as the dense step does, for nnx.scan.
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
    (total, (ce, (aux_loss, z_loss), stats)), (g_dense, g_deltas, _) = grad_fn(
        dense, deltas, state['extra'], tables)
    rows = touched_grads(cfg, tables, g_deltas, stats.touched, mesh)
    with jax.named_scope('optimizer'):   # litejax.analysis.bound reports the update's FLOPs and bytes by this scope
      grad_norm = sparse_optim.global_norm(g_dense, {k: g for k, (_, g) in rows.items()})
      # One clip factor for both: dense grads scaled here, row grads inside the row update.
      scale = sparse_optim.clip_scale(grad_norm, cfg.train.grad_clip)
      g_dense = jax.tree.map(lambda t: t * scale.astype(t.dtype), g_dense)
      updates, opt_dense = dense_tx.update(g_dense, state['opt']['dense'], dense)
      dense = optax.apply_updates(dense, updates)
      tables, opt_rows = apply_rows(cfg, tables, state['opt']['rows'], rows, schedule(state['step']), scale, mesh)
    params = nnx.merge_state(dense, tables)
    extra = state['extra']
    if cfg.moe.bias_update_rate > 0 and stats.tokens_per_expert.shape[0]:
      extra = update_bias(graphdef, params, extra, stats, cfg)
    metrics = step_metrics(cfg, ce, total, aux_loss, z_loss, grad_norm, stats)
    state = dict(state, params=params, extra=extra, opt={'dense': opt_dense, 'rows': opt_rows},
                 step=state['step'] + 1)
    return state, metrics

  return jax.jit(train_step, in_shardings=(shardings, batch_sharding, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=(0,))
