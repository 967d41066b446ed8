"""Per-chip facts of each TPU generation, one cited public source per number.

Units are SI and per chip: bytes, bytes/s, FLOP/s. `ici_bytes_per_s` is the bidirectional inter-chip
interconnect bandwidth of one chip (all its links together), the figure Google quotes per chip; the
latency model divides a chip's collective bytes by it, so communication time is a lower bound (no
link contention, perfect overlap of links).

Where a page quotes a unit of GiB, the number is GiB; "GB"/"GBps" is 1e9. HBM is what one chip has;
`devices_per_chip` is how many JAX devices `jax.experimental.topologies` makes per chip for that
generation (2 for v4, whose two TensorCores it exposes separately; 1 elsewhere, megacore/one core).

`kernel_overhead_s` is the fixed time one executed kernel (an HLO fusion, dot, sort, copy, ...;
litejax.hlo.parse.kernel_counts) costs beyond its FLOPs and bytes. For a calibrated host it is measured by
`litejax calibrate` (XLA:CPU runs each kernel as a thunk: dispatch, and a thread-pool hand-off for
partitioned loops). For the TPU chips it is 0, i.e. NOT modelled: a TPU step runs as one device
program with no per-kernel host launch, and Google publishes no per-fusion figure to cite.
`transpose_bytes_per_s` is the bandwidth of kernels that permute dimensions (litejax.hlo.parse.transposes);
0 means "as hbm_bytes_per_s" (the TPU chips: not modelled apart).
`call_overhead_s` is the host time of one call a serving loop makes into the runtime per step (a
jitted call's dispatch of its arguments, a device_put, a device_get) beyond the kernels it runs: a
decode loop pays it a fixed number of times per token (litejax.inference.decode.HOST_CALLS_PER_STEP), which at
batch 1 is a large share of a step on a CPU. Measured by `litejax calibrate` (a loop of such calls
around a program with no work); 0 for the TPU chips (not modelled: no published figure to cite).
`gather_bytes_per_s` prices the bytes of kernels that gather rows (a decode step's per-token gather
of its K experts' weights, fused with a layout change): row by row from a table, below streaming
bandwidth on a CPU. `sort_comparison_s` prices a sort kernel's n·log2(n) comparisons per row (the
sampler sorts the vocabulary): XLA:CPU calls a compiled comparator for each one. Both are measured by
`litejax calibrate`; 0 on the TPU chips (as hbm_bytes_per_s / not modelled).
"""
from __future__ import annotations

import dataclasses

GiB = 1024 ** 3
GB = 1e9

_V5P = 'https://docs.cloud.google.com/tpu/docs/v5p'
_V5E = 'https://docs.cloud.google.com/tpu/docs/v5e'
_V6E = 'https://docs.cloud.google.com/tpu/docs/v6e'
_V4 = 'https://docs.cloud.google.com/tpu/docs/v4'


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: capacity, bandwidths and peak, each with where the number comes from."""
  generation: str               # 'v5p', 'v5e', 'v6e', 'v4' (or 'cpu' for a calibrated host)
  device_kind: str              # jax Device.device_kind of the compile-only devices
  hbm_bytes: float
  hbm_bytes_per_s: float
  peak_flops: float             # dense bf16 FLOP/s (for 'cpu': measured f32 matmul FLOP/s)
  ici_bytes_per_s: float        # bidirectional, per chip
  max_chips: int                # largest slice (a whole pod)
  torus_dims: int               # 2 (v5e, v6e) or 3 (v4, v5p)
  devices_per_chip: int = 1
  kernel_overhead_s: float = 0.0  # seconds per executed kernel (see the module docstring)
  transpose_bytes_per_s: float = 0.0  # bandwidth of dimension-permuting kernels; 0 = hbm_bytes_per_s
  call_overhead_s: float = 0.0  # host seconds per call into the runtime (see the module docstring)
  gather_bytes_per_s: float = 0.0  # bandwidth of kernels that gather rows; 0 = hbm_bytes_per_s
  sort_comparison_s: float = 0.0  # seconds per comparison of a sort kernel; 0 = not modelled
  sources: dict[str, str] = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


CHIPS: dict[str, Chip] = {
    'v5p': Chip(
        'v5p', 'TPU v5', hbm_bytes=95 * GiB, hbm_bytes_per_s=2765 * GB, peak_flops=459e12,
        ici_bytes_per_s=1200 * GB, max_chips=8960, torus_dims=3,
        sources={
            'hbm_bytes': f'{_V5P} ("HBM capacity per chip (GiB): 95")',
            'hbm_bytes_per_s': f'{_V5P} ("HBM bandwidth per chip (GBps): 2765")',
            'peak_flops': f'{_V5P} ("Peak compute per chip (BF16) (TFLOPs): 459")',
            'ici_bytes_per_s': f'{_V5P} ("Bidirectional inter-chip interconnect (ICI) bandwidth per chip '
                               '(GBps): 1200")',
            'max_chips': f'{_V5P} ("Number of chips per pod: 8960")',
        }),
    'v5e': Chip(
        'v5e', 'TPU v5 lite', hbm_bytes=16 * GB, hbm_bytes_per_s=819 * GB, peak_flops=197e12,
        ici_bytes_per_s=400 * GB, max_chips=256, torus_dims=2,
        sources={
            'hbm_bytes': f'{_V5E} ("HBM2 capacity and bandwidth: 16 GB, 819 GBps")',
            'hbm_bytes_per_s': f'{_V5E} ("HBM2 capacity and bandwidth: 16 GB, 819 GBps")',
            'peak_flops': f'{_V5E} ("Peak compute per chip (bf16): 197 TFLOPs")',
            'ici_bytes_per_s': f'{_V5E} ("Bidirectional inter-chip interconnect (ICI) bandwidth (per chip): '
                               '400 GBps")',
            'max_chips': f'{_V5E} ("TPU Pod size: 256 chips")',
        }),
    'v6e': Chip(
        'v6e', 'TPU v6 lite', hbm_bytes=32 * GB, hbm_bytes_per_s=1638 * GB, peak_flops=918e12,
        ici_bytes_per_s=800 * GB, max_chips=256, torus_dims=2,
        sources={
            'hbm_bytes': f'{_V6E} ("HBM capacity per chip: 32 GB")',
            'hbm_bytes_per_s': f'{_V6E} ("HBM bandwidth per chip: 1638 GBps")',
            'peak_flops': f'{_V6E} ("Peak compute per chip (bf16): 918 TFLOPs")',
            'ici_bytes_per_s': f'{_V6E} ("Bidirectional inter-chip interconnect (ICI) bandwidth (per chip): '
                               '800 GBps")',
            'max_chips': f'{_V6E} ("TPU Pod size: 256 chips")',
        }),
    # The v4 page quotes no per-chip ICI figure; it is derived from its pod all-reduce bandwidth the
    # way v5e/v6e relate theirs (v5e: 51.2 TB/s / 256 chips = 200 GB/s = half its 400 GBps
    # bidirectional figure; v6e: 102.4 TB/s / 256 = 400 = half of 800): 2 * 1.1 PB/s / 4096 chips.
    'v4': Chip(
        'v4', 'TPU v4', hbm_bytes=32 * GiB, hbm_bytes_per_s=1200 * GB, peak_flops=275e12,
        ici_bytes_per_s=2 * 1.1e15 / 4096, max_chips=4096, torus_dims=3, devices_per_chip=2,
        sources={
            'hbm_bytes': f'{_V4} ("HBM2 capacity and bandwidth: 32 GiB, 1200 GBps")',
            'hbm_bytes_per_s': f'{_V4} ("HBM2 capacity and bandwidth: 32 GiB, 1200 GBps")',
            'peak_flops': f'{_V4} ("Peak compute per chip: 275 teraflops (bf16 or int8)")',
            'ici_bytes_per_s': f'derived: 2 x "All-reduce bandwidth per Pod: 1.1 PB/s" / "TPU Pod size: '
                               f'4096 chips" ({_V4}); see the comment above',
            'max_chips': f'{_V4} ("TPU Pod size: 4096 chips")',
        }),
}

# Slice shapes, smallest first, that `litejax plan` tries (from the topology tables of the pages
# above; 1-chip shapes are left out because the compile-only topology API needs whole hosts).
SLICES: dict[str, tuple[str, ...]] = {
    'v5p': ('2x2x1', '2x2x2', '2x4x4', '4x4x4', '4x4x8', '4x8x8', '8x8x8', '8x8x16', '8x16x16',
            '16x16x16', '16x16x24', '16x20x28'),
    'v5e': ('2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16'),
    'v6e': ('2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16'),
    'v4': ('2x2x1', '2x2x2', '2x2x4', '2x4x4', '4x4x4', '4x4x8', '4x8x8', '8x8x8', '8x8x16', '8x16x16',
           '16x16x16'),
}


# Dense (no sparsity) bf16 peak of GPUs, for MFU in `litejax train` (TPUs use CHIPS above).
# Sources: NVIDIA's H100 / H200 / A100 / L4 datasheets (nvidia.com/en-us/data-center/h100/, .../h200/,
# .../a100/, .../l4/); the datasheets quote bf16 "with sparsity", which is 2x the dense figure below.
GPU_PEAK_FLOPS: dict[str, float] = {
    'NVIDIA H200': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
}


def peak_flops_for_device_kind(kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one JAX device by its `device_kind`, or None (CPU, unknown chips).

  On TPU VMs a JAX device is one chip (megacore on v4), so it gets the chip's peak.
  """
  table = {c.device_kind: c.peak_flops for c in CHIPS.values()}
  table.update(GPU_PEAK_FLOPS)
  table.setdefault('TPU v5e', CHIPS['v5e'].peak_flops)
  table.setdefault('TPU v5p', CHIPS['v5p'].peak_flops)
  table.setdefault('TPU v6e', CHIPS['v6e'].peak_flops)
  for prefix in sorted(table, key=len, reverse=True):
    if kind.startswith(prefix):
      return table[prefix]
  return None


def chip(generation: str) -> Chip:
  """The Chip of a generation name ('v5p', 'v5e', 'v6e', 'v4'); ValueError naming the known ones."""
  try:
    return CHIPS[generation]
  except KeyError:
    raise ValueError(f'unknown TPU generation {generation!r} (known: {sorted(CHIPS)})') from None


def cpu_chip(peak_flops: float, mem_bytes_per_s: float, mem_bytes: float = 0.0,
              kernel_overhead_s: float = 0.0, transpose_bytes_per_s: float = 0.0,
              call_overhead_s: float = 0.0, gather_bytes_per_s: float = 0.0,
              sort_comparison_s: float = 0.0) -> Chip:
  """The Chip of a CPU with these measured figures: peak, bandwidths, per-kernel and per-call overheads
  (litejax.perf.host.measure_host measures them; `chip` gives a TPU generation's datasheet Chip)."""
  return Chip('cpu', 'cpu', hbm_bytes=mem_bytes, hbm_bytes_per_s=mem_bytes_per_s, peak_flops=peak_flops,
              ici_bytes_per_s=mem_bytes_per_s, max_chips=1, torus_dims=0, kernel_overhead_s=kernel_overhead_s,
              transpose_bytes_per_s=transpose_bytes_per_s, call_overhead_s=call_overhead_s,
              gather_bytes_per_s=gather_bytes_per_s, sort_comparison_s=sort_comparison_s,
              sources={'peak_flops': 'measured (litejax calibrate)', 'hbm_bytes_per_s': 'measured',
                       'ici_bytes_per_s': 'emulated devices share host memory: measured bandwidth',
                       'kernel_overhead_s': 'measured (litejax calibrate: a chain of small kernels)',
                       'transpose_bytes_per_s': 'measured (litejax calibrate: a chain of head transposes)',
                       'call_overhead_s': 'measured (litejax calibrate: a loop of host calls around no work)',
                       'gather_bytes_per_s': 'measured (litejax calibrate: per-row gathers of K expert rows)',
                       'sort_comparison_s': 'measured (litejax calibrate: a sort of vocabulary-sized rows)'})


# Serving from the tiered expert store (`litejax plan --serve`): what one chip's host offers beside HBM.
# host_ram_bytes: a v5p host (machine type ct5p-hightpu-4t) has 448 GB of memory for its 4 chips, i.e.
# 112 GB per chip (Google Cloud, TPU v5p, "System architecture"/machine types, _V5P above). The other
# generations are left out rather than guessed. host_to_hbm_bytes_per_s: the PCIe Gen4 x16 link of a
# TPU chip to its host, 32 GB/s theoretical per direction (PCI-SIG); disk_bytes_per_s: an assumption,
# a local NVMe SSD's sequential read of 2 GB/s per chip's share of the host -- measure it with
# `litejax calibrate` on a real host before trusting the I/O term.
SERVE_HOST = {
    'v5p': {'host_ram_bytes': 112 * GB, 'host_ram_source': _V5P + ' (ct5p-hightpu-4t: 448 GB for 4 chips)',
            'host_to_hbm_bytes_per_s': 32 * GB, 'disk_bytes_per_s': 2 * GB},
}
