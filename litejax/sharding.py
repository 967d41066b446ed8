"""Device mesh, logical -> mesh axis rules, and NamedShardings for parameters, optimizer state, batches.

This is the only module that names the physical mesh axes:
  data    — batch (data parallel); parameters are replicated over it.
  expert  — expert parallel: expert weights are split over it, and it also carries batch, so every
            expert rank holds tokens of its own (the all-to-all exchanges them).
  tensor  — attention heads, FFN hidden and expert hidden units (Megatron style).
The model names only logical axes (the `logical_axes` metadata of every parameter); `LOGICAL_RULES`
maps them here. Everything is jitted with explicit in/out shardings built from these functions.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from litejax.config import Config, ConfigError, MeshConfig, MoEConfig

AXES = ('data', 'expert', 'tensor')
BATCH_AXES = ('data', 'expert')

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    'batch': BATCH_AXES,          # tokens are split over data and expert ranks
    'sequence': None,
    'embed': None,                # d_model stays whole: every rank routes its own tokens
    'vocab': None,                # embedding lookup and tied logits without a sharded gather
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'mlp': 'tensor',
    'expert': 'expert',           # expert e lives on expert rank e // (E / R_EP): groups stay contiguous
    'expert_mlp': 'tensor',       # expert hidden h split over tensor; partial outputs psum'd
    # A group's router_expert row lives on the expert rank of its experts (litejax.model.moe.router_parallel scores
    # there); replicated instead where the expert ranks do not divide the groups (`groups_shard`).
    'expert_group': 'expert',
    'layers': None,               # the stacked axis of scanned layers
}


def resolve_sizes(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """(data, expert, tensor) sizes of `mesh_cfg` over `num_devices`: the one -1 axis takes what the fixed
  axes leave. ConfigError when the fixed axes do not divide the devices or their product is not theirs."""
  sizes = [mesh_cfg.data, mesh_cfg.expert, mesh_cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh: {num_devices} devices are not divisible by the fixed mesh axes '
                        f'(data, expert, tensor) = {tuple(sizes)} (product {known})')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh: data*expert*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} '
                      f'does not match the {num_devices} devices')
  return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A ('data', 'expert', 'tensor') mesh over `devices` (default: all devices, every process).

  Axis types are Auto: jit with NamedSharding in/out shardings lets XLA's partitioner place the
  dense math, and expert dispatch is explicit under shard_map. (jax 0.10's default Explicit axes
  would demand out_sharding annotations on every gather in the model.)
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_sizes(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh(sizes, AXES, axis_types=auto, devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  """{'data': ..., 'expert': ..., 'tensor': ...} of a litejax mesh."""
  return {name: int(mesh.shape[name]) for name in AXES}


def logical_to_spec(axes: tuple[str | None, ...], ndim: int | None = None) -> P:
  """PartitionSpec for logical axes; with ndim = len(axes) + 1 (scanned layers) a leading None."""
  axes = tuple(axes)
  if ndim is not None:
    if ndim == len(axes) + 1:
      axes = ('layers',) + axes
    elif ndim != len(axes):
      raise ValueError(f'logical axes {axes} do not fit an array of rank {ndim}')
  mesh_axes = []
  for a in axes:
    if a is not None and a not in LOGICAL_RULES:
      raise KeyError(f'logical axis {a!r} has no rule in litejax.sharding.LOGICAL_RULES')
    mesh_axes.append(None if a is None else LOGICAL_RULES[a])
  return P(*mesh_axes)


def logical_sharding(mesh: Mesh, axes: tuple[str | None, ...], ndim: int | None = None) -> NamedSharding:
  """NamedSharding of an array whose axes are the given logical axes."""
  return NamedSharding(mesh, logical_to_spec(axes, ndim))


def validate_mesh(cfg: Config, mesh: Mesh, global_batch: int) -> None:
  """Raises ConfigError (naming both numbers) when the mesh does not divide the model's shapes."""
  s = mesh_sizes(mesh)
  batch_ranks = s['data'] * s['expert']
  if global_batch % batch_ranks:
    raise ConfigError(f'batch size {global_batch} is not divisible by mesh data*expert = '
                      f'{s["data"]}*{s["expert"]} = {batch_ranks}')
  validate_model(cfg, s)


def validate_model(cfg: Config, s: dict[str, int]) -> None:
  """Raises ConfigError (naming the field and the axis) when mesh sizes {'data', 'expert', 'tensor'} do not
  divide the model's heads, FFN width or MoE layer."""
  m = cfg.model
  checks = [
      (m.num_heads % s['tensor'] == 0,
       f'model.num_heads ({m.num_heads}) is not divisible by mesh.tensor ({s["tensor"]})'),
      (m.attention == 'mla' or m.num_kv_heads % s['tensor'] == 0,   # MLA has no kv heads
       f'model.num_kv_heads ({m.num_kv_heads}) is not divisible by mesh.tensor ({s["tensor"]})'),
      (m.resolved_d_ff % s['tensor'] == 0,
       f'model.d_ff ({m.resolved_d_ff}) is not divisible by mesh.tensor ({s["tensor"]})'),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
  if m.num_moe_layers:
    validate_moe_mesh(cfg.moe, s)


def validate_moe_mesh(e: MoEConfig, s: dict[str, int]) -> None:
  """Raises ConfigError when mesh sizes {'data', 'expert', 'tensor'} do not divide the MoE layer."""
  checks = [
      (e.experts_total % s['expert'] == 0,
       f'moe experts per layer ({e.experts_total} = num_tiers*groups_per_tier*experts_per_group) '
       f'is not divisible by mesh.expert ({s["expert"]})'),
      (e.d_expert % s['tensor'] == 0,
       f'moe.d_expert ({e.d_expert}) is not divisible by mesh.tensor ({s["tensor"]})'),
      (not e.num_shared_experts or (e.num_shared_experts * e.resolved_d_shared) % s['tensor'] == 0,
       f'shared expert hidden ({e.num_shared_experts * e.resolved_d_shared}) is not divisible by '
       f'mesh.tensor ({s["tensor"]})'),
  ]
  groups = e.num_tiers * e.groups_per_tier
  if e.rank_aligned_groups:
    checks.append((groups % s['expert'] == 0,
                   f'moe.rank_aligned_groups: groups per layer ({groups} = num_tiers*groups_per_tier) '
                   f'is not divisible by mesh.expert ({s["expert"]})'))
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


def groups_shard(num_groups: int, expert_ranks: int) -> bool:
  """Whether a table split by routing group ('expert_group') is split over the expert ranks: when there
  are several and they divide the T·G groups (experts are contiguous, so group g's experts then live on
  rank g // (T·G / R_EP)); otherwise it is replicated."""
  return expert_ranks > 1 and num_groups % expert_ranks == 0


def router_expert_split(m: MoEConfig, expert_ranks: int) -> bool:
  """Whether router_expert is split by group over the expert ranks and its level scored on the groups'
  owners (litejax.model.moe.router_parallel): its level gathers the groups it scores
  (MoEConfig.router_expert_visits < T·G) and the ranks divide the groups (`groups_shard`)."""
  groups = m.num_tiers * m.groups_per_tier
  return m.router_expert_visits < groups and groups_shard(groups, expert_ranks)


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _var_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
  axes = var.get_metadata().get('logical_axes')
  ndim = len(var.shape)
  if axes is None:
    return NamedSharding(mesh, P())
  spec = logical_to_spec(axes, ndim)
  if 'expert_group' in axes:   # replicated where the expert ranks do not divide the groups
    dim = ndim - len(axes) + list(axes).index('expert_group')
    if not groups_shard(var.shape[dim], int(mesh.shape['expert'])):
      spec = P(*[None if i == dim else a for i, a in enumerate(spec)])
  return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """The state's structure with each Variable's value replaced by its NamedSharding.

  Works on a materialised state (`nnx.split(model)`) and an abstract one (`nnx.state(abstract)`).
  Variables without `logical_axes` metadata are replicated.
  """
  return jax.tree.map(lambda v: v.replace(_var_sharding(v, mesh)), state, is_leaf=_is_var)


def _path_key(path) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,)) for k in path)


def tree_shardings_like(tree: Any, param_shardings: Any) -> Any:
  """Shardings for a pytree derived from the parameters (e.g. optax state).

  A leaf whose key path ends with a parameter's key path and has that parameter's rank gets the
  parameter's sharding (Adam moments mirror parameters); everything else (step counts, scalars,
  factored statistics) is replicated on the same mesh.
  """
  flat = jax.tree_util.tree_leaves_with_path(param_shardings)
  if not flat:
    raise ValueError('tree_shardings_like: param_shardings has no leaves')
  mesh = flat[0][1].mesh
  by_path = {_path_key(p): s for p, s in flat}
  longest = max(len(k) for k in by_path)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = _path_key(path)
    ndim = len(getattr(leaf, 'shape', ()))
    for start in range(max(0, len(key) - longest), len(key)):
      s = by_path.get(key[start:])
      # Specs built here name every dim, so a rank mismatch means "not a mirror of the param".
      if s is not None and len(s.spec) in (0, ndim):
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, S] token batches: batch over data and expert ranks, sequence whole."""
  return logical_sharding(mesh, ('batch', 'sequence'))


__all__ = ['AXES', 'BATCH_AXES', 'LOGICAL_RULES', 'make_mesh', 'mesh_sizes', 'logical_to_spec',
           'logical_sharding', 'groups_shard', 'validate_mesh', 'validate_moe_mesh', 'state_shardings',
           'tree_shardings_like', 'batch_sharding']
