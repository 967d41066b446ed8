"""The process environment JAX and libtpu read at start-up, the one place litejax sets it: the emulated CPU
device count, keeping an installed libtpu quiet on a machine without a TPU (commands, and the compile-only
TPU targets of litejax.analysis.targets), and the environment of a child JAX process (tests, experiments).
Set before JAX is imported (XLA reads XLA_FLAGS once); nothing here imports JAX."""
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
# libtpu's name for a slice of each generation (TPU_ACCELERATOR_TYPE).
_ACCELERATOR_TYPE = {'v4': 'v4-8', 'v5p': 'v5p-8', 'v5e': 'v5litepod-4', 'v6e': 'v6e-4'}


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


def tpu_attached() -> bool:
  """Whether a TPU chip is on this machine's PCI bus (reads PCI ids, so it needs no jax)."""
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      if (pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and
          pathlib.Path(vendor).with_name('device').read_text().strip() in _TPU_PCI_DEVICES):
        return True
    except OSError:
      continue
  return False


def quiet_libtpu(generation: str | None = None) -> None:
  """On a machine with no TPU attached, keeps an installed libtpu from probing for a Cloud TPU VM.

  With no TPU libtpu asks the GCE metadata server for the accelerator type and worker hostnames and
  prints a warning for each; naming them (and skipping the metadata query) makes compile-only use
  silent. `generation` ('v5p', ...) names the accelerator type; its value only quiets the probe (a
  compile target's topology is the one it names). ALLOW_MULTIPLE_LIBTPU_LOAD lets several processes
  (pytest-xdist workers, two users) load it at once: compile-only use takes no device, so the
  exclusive lockfile (/tmp/libtpu_lockfile) is not needed. Set before libtpu loads; existing values
  are kept; on a TPU VM nothing changes."""
  if tpu_attached():
    return    # a TPU chip: leave libtpu to find it
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', _ACCELERATOR_TYPE.get(generation or 'v5p', 'v5p-8'))
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')


def child_env(devices: int | None = None, *, platform: str | None = 'cpu', **extra: str) -> dict[str, str]:
  """The environment of a child JAX process: this one's, with `devices` emulated CPU devices (the XLA_FLAGS
  device count replaced, other flags kept; None: no count, so one device), JAX_PLATFORMS=platform
  (None: inherited) and `extra` variables (e.g. JAX_COMPILATION_CACHE_DIR)."""
  env = dict(os.environ, **extra)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_FLAG)]
  if devices is not None:
    if devices < 1:
      raise ValueError(f'device count must be >= 1, got {devices}')
    flags.append(f'{_FLAG}={devices}')
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  else:
    env.pop('XLA_FLAGS', None)
  if platform is not None:
    env['JAX_PLATFORMS'] = platform
  return env
