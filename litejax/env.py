"""The process environment JAX and libtpu read at start-up: the emulated CPU device count, and keeping an
installed libtpu quiet on a machine without a TPU. Set before JAX is imported (XLA reads XLA_FLAGS once)."""
from __future__ import annotations

import glob
import os
import pathlib
import sys

_FLAG = '--xla_force_host_platform_device_count'
_GOOGLE_PCI_VENDOR = '0x1ae0'
# PCI device ids of TPU chips (v3 ... 7x), as jax._src.hardware_utils lists them; Google's vendor id
# alone also matches the gVNIC network card of any GCE VM.
_TPU_PCI_DEVICES = {'0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076'}


def set_cpu_device_count(n: int, *, cpu_only: bool = False) -> bool:
  """Make the CPU backend present `n` devices; False (and nothing changed) when jax is already imported.

  Replaces any device count already in XLA_FLAGS and keeps the other flags. cpu_only: also default
  JAX_PLATFORMS to cpu (a compile-only analysis must not grab an accelerator).
  """
  if n < 1:
    raise ValueError(f'device count must be >= 1, got {n}')
  if 'jax' in sys.modules:
    return False
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_FLAG)]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'{_FLAG}={n}'])
  if cpu_only:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  return True


def quiet_libtpu() -> None:
  """On a machine with no TPU attached, keeps an installed libtpu from probing the GCE metadata server
  and printing its initialisation errors (the same settings as litejax.analysis.targets' compile-only use).
  Set before jax loads; on a TPU VM nothing changes. Reads PCI ids rather than importing jax, so the
  commands can still set XLA_FLAGS first."""
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      if (pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and
          pathlib.Path(vendor).with_name('device').read_text().strip() in _TPU_PCI_DEVICES):
        return    # a TPU chip: leave libtpu to find it
    except OSError:
      continue
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
