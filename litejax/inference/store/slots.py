"""The device slot buffer: per MoE layer, static-shape [slots, ...] arrays of expert weights on device.

Experts arrive from the host level as arrays in JAX's `pinned_host` memory (the staging copy a DMA
reads from; on CPU in jax 0.10.2 it is listed but is not physically separate) and are written into
their slots by one jitted `.at[slot].set` of every expert array at once, with the buffers donated, so the
update is in place, costs one dispatch per load, and compiles once per load width, whatever slots it fills.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np


def memory_sharding(kind: str, device: jax.Device | None = None) -> jax.sharding.SingleDeviceSharding:
  """A single-device sharding in memory `kind` ('device' or 'pinned_host')."""
  return jax.sharding.SingleDeviceSharding(device or jax.devices()[0], memory_kind=kind)


def to_pinned_host(x, device: jax.Device | None = None):
  """A host copy of `x` (an array or a pytree of arrays) in pinned_host memory, ready to be moved onto
  `device`."""
  return jax.device_put(x, memory_sharding('pinned_host', device))


def _set_slots(bufs, slots_n, values, device_sharding):
  # Every array of the experts in one program (one dispatch per load, not one per array). Out-of-range
  # slots (padding up to the load width) are dropped, not clamped onto a real slot.
  return {name: buf_snk.at[slots_n].set(jax.device_put(values[name], device_sharding).astype(buf_snk.dtype),
                                        mode='drop')
          for name, buf_snk in bufs.items()}


class DeviceSlots:
  """`buffers[name]` is a [num_slots, *shape] device array per expert array (w_in, w_gate, w_out)."""

  def __init__(self, num_slots: int, shapes: Mapping[str, Sequence[int]], dtype, load_width: int,
               device: jax.Device | None = None):
    if num_slots <= 0 or load_width <= 0:
      raise ValueError(f'num_slots ({num_slots}) and load_width ({load_width}) must be > 0')
    self.num_slots, self.load_width = num_slots, load_width
    self.device_sharding = memory_sharding('device', device)
    self.device = device
    self.buffers = {name: jax.device_put(np.zeros((num_slots, *shape), dtype), self.device_sharding)
                    for name, shape in shapes.items()}
    self._set = jax.jit(_set_slots, donate_argnums=0, static_argnums=3)

  def load(self, slots: Sequence[int], experts: Mapping[str, np.ndarray | jax.Array]) -> None:
    """Writes experts[name][i] into slot slots[i] of every buffer; up to `load_width` experts per call
    (the call pads to that width so every load reuses one compiled program)."""
    n = len(slots)
    if n > self.load_width:
      raise ValueError(f'load of {n} experts exceeds load_width {self.load_width}')
    if any(not 0 <= s < self.num_slots for s in slots):
      raise ValueError(f'slots {list(slots)}: must be in [0, {self.num_slots})')
    idx = np.full(self.load_width, self.num_slots, np.int32)   # pad with an out-of-range slot: dropped
    idx[:n] = slots
    padded = {}
    for name in self.buffers:
      x = np.asarray(experts[name])
      padded[name] = np.zeros((self.load_width, *x.shape[1:]), x.dtype)
      padded[name][:n] = x
    # one host -> pinned_host transfer of all arrays, one program writing them into their slots
    self.buffers = self._set(self.buffers, idx, to_pinned_host(padded, self.device), self.device_sharding)

  def gather(self, slots_n: jax.Array) -> dict[str, jax.Array]:
    """{name: [n, ...]} the experts in slots `slots_n` (what a decode step feeds its expert matmuls)."""
    return {name: buf[slots_n] for name, buf in self.buffers.items()}
