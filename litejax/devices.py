"""The emulated CPU device count, set before JAX is imported (XLA reads XLA_FLAGS once, at start-up)."""
from __future__ import annotations

import os
import sys

_FLAG = '--xla_force_host_platform_device_count'


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
