"""Shared by the training/checkpoint tests: the tiny config and a persistent compilation cache.

Each train() call jits fresh closures and several tests run the same programs in subprocesses, so on
a 2-core CI machine most of their time would be XLA recompiling identical HLO; the on-disk cache
(keyed by the HLO, flags and jax version) makes every program compile once per checkout.
"""
import pathlib

import jax

from litejax import env

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_YAML = REPO / 'configs' / 'tiny.yaml'
COMPILE_CACHE = REPO / '.pytest_cache' / 'jax-compile-cache'
# 2 layers of d=32 with 16 experts of h=32: seconds to compile, still every code path of tiny.yaml.
TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=2', 'model.num_kv_heads=2',
        'model.seq_len=32', 'moe.d_expert=32', 'train.batch_size=8', 'train.warmup_steps=2',
        'train.log_every=1', 'train.eval_batches=1']


# Every program is cached, however quick to compile: a checkpoint save on the 8-device mesh runs ~60 tiny
# slicing programs (Orbax copies one replica of each shard), each compiling in well under 0.2 s, which a
# child process that saves (tests/test_train.py's preemptions) would otherwise compile afresh: seconds each.
MIN_COMPILE_TIME_S = 0.0


def enable_compile_cache() -> None:
  COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', str(COMPILE_CACHE))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_S)


def subprocess_env(devices: int | None) -> dict[str, str]:
  """Environment for a child JAX process with `devices` CPU devices and the same compile cache."""
  return env.child_env(devices, JAX_COMPILATION_CACHE_DIR=str(COMPILE_CACHE),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(MIN_COMPILE_TIME_S))
