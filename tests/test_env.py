"""litejax.env: the child-process environment (device count, platform, extra variables)."""
import pytest

from litejax import env


def test_child_env_replaces_the_device_count_and_keeps_other_flags(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x')
  e = env.child_env(2, JAX_COMPILATION_CACHE_DIR='/c')
  assert e['XLA_FLAGS'].split() == ['--xla_dump_to=/tmp/x', '--xla_force_host_platform_device_count=2']
  assert e['JAX_PLATFORMS'] == 'cpu' and e['JAX_COMPILATION_CACHE_DIR'] == '/c'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert 'XLA_FLAGS' not in env.child_env(None)                  # one device: no count left
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu')
  assert env.child_env(1, platform=None)['JAX_PLATFORMS'] == 'tpu'
  with pytest.raises(ValueError, match='device count'):
    env.child_env(0)
