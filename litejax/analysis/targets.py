"""Compile targets: an emulated CPU mesh (`cpu:N`) or a real TPU topology (`v5p:8x8x8`) from a CPU machine.

A TPU target needs no TPU: with libtpu installed (`pip install 'litejax[tpu]'`),
`jax.experimental.topologies.get_topology_desc` returns compile-only devices of the named slice, a
mesh over them takes the config's rules as any other, and `jit(...).lower(...).compile()` gives that
chip's `cost_analysis()` and `memory_analysis()`. This module parses the spec, quiets libtpu's
cloud-VM probes (litejax.env) and lays the config's mesh over the target's devices; the per-chip report
of one compiled program (`litejax bound --target`, `litejax plan`) is litejax.analysis.per_chip's.
"""
from __future__ import annotations

import dataclasses
import math
import re

from litejax import env, jaxcompat
from litejax.perf import chips as hardware
from litejax.config import ConfigError

_SPEC_RE = re.compile(r'^(cpu|v4|v5p|v5e|v6e):(\d+(?:x\d+)*)$')
_DIMS = {'v4': 3, 'v5p': 3, 'v5e': 2, 'v6e': 2}


class TargetError(ValueError):
  """A --target spec is malformed, unknown, or needs something that is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A resolved compile target: its devices and (for TPU) the chip's facts."""
  spec: str
  platform: str                 # 'cpu' or 'tpu'
  generation: str | None        # 'v5p', ... (None for cpu)
  dims: tuple[int, ...]         # chip grid (cpu: (N,))
  devices: tuple
  chip: hardware.Chip | None

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def devices_per_chip(self) -> int:
    return max(1, len(self.devices) // self.chips)


def parse_target(spec: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:8x8x8' -> ('v5p', (8, 8, 8)); 'cpu:8' -> ('cpu', (8,)). TargetError when malformed."""
  m = _SPEC_RE.match(spec.strip().lower())
  if not m:
    raise TargetError(f'--target {spec!r}: expected cpu:N or GENERATION:AxB[xC] with GENERATION one of '
                      f'{sorted(_DIMS)} (e.g. v5p:8x8x8, v5e:16x16, v6e:8x8, v4:4x4x4)')
  kind, dims = m.group(1), tuple(int(x) for x in m.group(2).split('x'))
  want = 1 if kind == 'cpu' else _DIMS[kind]
  if len(dims) != want or min(dims) < 1:
    shape = 'N' if kind == 'cpu' else 'x'.join('ABC'[:want])
    raise TargetError(f'--target {spec!r}: {kind} takes {kind}:{shape} ({want} positive sizes)')
  return kind, dims


def libtpu_requirement() -> str:
  """The libtpu requirement jax's own `tpu` extra pins for the installed jax (e.g. 'libtpu==0.0.42.*')."""
  from importlib import metadata
  for req in metadata.requires('jax') or ():
    if req.startswith('libtpu') and 'extra == "tpu"' in req:
      return req.split(';')[0].strip()
  return 'libtpu'


def libtpu_version() -> str | None:
  from importlib import metadata
  try:
    return metadata.version('libtpu')
  except metadata.PackageNotFoundError:
    return None


def _missing_libtpu(spec: str) -> TargetError:
  import jax
  return TargetError(
      f"--target {spec}: compiling for TPU needs libtpu, which is not installed. Install the extra: "
      f"pip install 'litejax[tpu]'  (it brings {libtpu_requirement()}, the libtpu that jax {jax.__version__}'s "
      f"jax[tpu] pins; no TPU is needed). Or use --target cpu:N for an emulated CPU mesh.")


def _tpu_devices(spec: str, generation: str, dims: tuple[int, ...]) -> list:
  if libtpu_version() is None:
    raise _missing_libtpu(spec)
  env.quiet_libtpu(generation)   # before libtpu loads
  jaxcompat.prefer_cpu_backend()
  from jax.experimental import topologies
  name = f'{generation}:{"x".join(map(str, dims))}'
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
  except Exception as e:  # libtpu raises JaxRuntimeError with its own message for bad shapes
    raise TargetError(f'--target {spec}: libtpu rejected topology {name!r}: {str(e).splitlines()[0]}') from None


def _cpu_devices(spec: str, n: int) -> list:
  import jax
  devices = jax.devices('cpu')
  if len(devices) < n:
    raise TargetError(f'--target {spec}: only {len(devices)} CPU devices in this process; start it with '
                      f'XLA_FLAGS=--xla_force_host_platform_device_count={n} (litejax commands set it '
                      f'before importing jax)')
  return devices[:n]


def resolve(spec: str) -> Target:
  """The Target of a spec: its devices (compile-only for TPU) and chip facts."""
  kind, dims = parse_target(spec)
  if kind == 'cpu':
    return Target(spec, 'cpu', None, dims, tuple(_cpu_devices(spec, dims[0])), None)
  devices = _tpu_devices(spec, kind, dims)
  return Target(spec, 'tpu', kind, dims, tuple(devices), hardware.chip(kind))


def target_mesh(cfg, target: Target):
  """(cfg, mesh): the config's (data, expert, tensor) mesh rules laid over the target's devices.

  `mesh.data: -1` takes whatever the fixed axes leave, as on a CPU mesh; jax.make_mesh orders
  TPU devices by their physical coordinates so mesh axes follow the torus.
  """
  from litejax import sharding
  from litejax.config import MeshConfig
  devices = list(target.devices)
  if len(devices) == 1:
    cfg = cfg.replace(mesh=MeshConfig(data=1, expert=1, tensor=1))
  try:
    return cfg, sharding.make_mesh(cfg.mesh, devices)
  except ConfigError as e:
    raise ConfigError(f'{e} (target {target.spec}: {len(devices)} devices)') from None
  except NotImplementedError:
    # A mesh axis that is no product of whole torus axes (expert=8 on 16x20x28): split physical
    # axes, as a user of that slice would have to.
    return cfg, _split_axes_mesh(cfg, devices)


def _split_axes_mesh(cfg, devices):
  import jax
  import numpy as np
  from jax.experimental import mesh_utils

  from litejax import sharding
  sizes = sharding.resolve_sizes(cfg.mesh, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except Exception:  # jax's axis splitter fails on some shapes (16x20x28 with 8): plain device order
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  auto = (jax.sharding.AxisType.Auto,) * len(sizes)
  return jax.sharding.Mesh(grid, sharding.AXES, axis_types=auto)
