"""Train loop: the loss falls, metrics land in JSONL, and a SIGKILLed run resumes bit for bit."""
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from litejax import train as train_lib
from litejax.config import load_config
from litejax.metrics import read_metrics
from train_helpers import REPO, TINY, enable_compile_cache, subprocess_env

TINY = TINY + ['train.eval_every=10']
enable_compile_cache()
METRIC_KEYS = {'step', 'loss', 'aux_loss', 'z_loss', 'drop_fraction', 'tokens_per_second',
               'expert_load_entropy'}


def tiny_cfg(*extra):
  return load_config(REPO / 'configs' / 'tiny.yaml', TINY + list(extra))


def test_schedule_warms_up_then_decays():
  tc = tiny_cfg('train.steps=100', 'train.warmup_steps=10', 'train.lr=1e-3', 'train.min_lr_ratio=0.1').train
  sched = train_lib.lr_schedule(tc)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(100)) == pytest.approx(1e-4)


def test_peak_flops_table():
  class Dev:
    device_kind = 'TPU v5 lite'
  assert train_lib.peak_flops_per_device(Dev()) == 197e12
  Dev.device_kind = 'cpu'
  assert train_lib.peak_flops_per_device(Dev()) is None


def test_30_steps_loss_falls_and_metrics_jsonl(tmp_path):
  cfg = tiny_cfg('train.steps=30')
  metrics = tmp_path / 'm.jsonl'
  result = train_lib.train(cfg, ckpt_dir=tmp_path / 'ckpt', metrics_path=metrics, quiet=True)
  assert result.status == 'done' and result.step == 30
  records = read_metrics(metrics)
  assert [r['step'] for r in records] == list(range(1, 31))
  for r in records:
    assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
    assert 0.0 <= r['drop_fraction'] <= 1.0 and 0.0 < r['expert_load_entropy'] <= 1.0
  assert [r['step'] for r in records if 'val_loss' in r] == [10, 20, 30]
  first = np.mean([r['loss'] for r in records[:5]])
  last = np.mean([r['loss'] for r in records[-5:]])
  assert last < first - 1.0, (first, last)   # byte-level CE starts near ln 256 = 5.5
  assert result.val_loss < records[0]['loss']
  assert metrics.with_suffix('.png').stat().st_size > 1000


KILL_SCRIPT = textwrap.dedent('''
    import os, pathlib, signal, sys, time
    from litejax import train as train_lib
    from litejax.config import load_config
    cfg = load_config(sys.argv[1], sys.argv[4:])
    ckpt = pathlib.Path(sys.argv[2])

    def kill_after_15(step, metrics):
      if step == 15:
        # The step-10 save is asynchronous: wait until Orbax has committed it, then die hard.
        deadline = time.time() + 60
        while not (ckpt / '10').is_dir() and time.time() < deadline:
          time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    train_lib.train(cfg, ckpt_dir=ckpt, metrics_path=sys.argv[3], quiet=True, on_step=kill_after_15)
''')


def test_sigkill_resume_is_bit_exact(tmp_path):
  overrides = ['train.steps=20', 'train.ckpt_every=10', 'train.eval_every=100']
  cfg = tiny_cfg(*overrides)
  full = train_lib.train(cfg, metrics_path=tmp_path / 'full.jsonl', quiet=True)

  env = subprocess_env(8)
  proc = subprocess.run(
      [sys.executable, '-c', KILL_SCRIPT, str(REPO / 'configs' / 'tiny.yaml'), str(tmp_path / 'ckpt'),
       str(tmp_path / 'killed.jsonl'), *TINY, *overrides],
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert [r['step'] for r in read_metrics(tmp_path / 'killed.jsonl')][-1] == 15

  resumed = train_lib.train(cfg, ckpt_dir=tmp_path / 'ckpt', resume=True,
                            metrics_path=tmp_path / 'killed.jsonl', quiet=True)
  assert resumed.status == 'done'
  assert [r['step'] for r in resumed.history] == list(range(11, 21))   # restarted from step 10
  want = {r['step']: r['loss'] for r in full.history if r['step'] > 10}
  got = {r['step']: r['loss'] for r in resumed.history}
  assert got == want      # bit for bit: float equality of every loss
  # The resumed run rewrote the metrics file: steps 1..20 once each (11..15 of the killed run dropped).
  assert [r['step'] for r in read_metrics(tmp_path / 'killed.jsonl')] == list(range(1, 21))


def test_cli_stop_after_then_resume_matches(tmp_path):
  """`--stop-after 3` then `--resume` ends where one uninterrupted 6-step run ends (CLI path, 1 device)."""
  base = [sys.executable, '-m', 'litejax.cli', 'train', '--devices', '1', '--quiet', '--steps', '6',
          *[a for o in TINY for a in ('--set', o)]]
  env = subprocess_env(None)
  run = lambda *a: subprocess.run(base + list(a), env=env, capture_output=True, text=True, timeout=300,  # noqa: E731
                                  cwd=tmp_path)
  p = run('--ckpt-dir', 'a', '--metrics', 'a.jsonl', '--stop-after', '3')
  assert p.returncode == 0, p.stderr[-3000:]
  p = run('--ckpt-dir', 'a', '--metrics', 'a.jsonl', '--resume')
  assert p.returncode == 0, p.stderr[-3000:]
  p = run('--ckpt-dir', 'b', '--metrics', 'b.jsonl')
  assert p.returncode == 0, p.stderr[-3000:]
  a = [(r['step'], r['loss']) for r in read_metrics(tmp_path / 'a.jsonl')]
  b = [(r['step'], r['loss']) for r in read_metrics(tmp_path / 'b.jsonl')]
  assert a == b and len(a) == 6
  assert json.loads((tmp_path / 'b.jsonl').read_text().splitlines()[-1])['val_loss'] > 0
