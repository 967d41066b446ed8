"""Train loop: the loss falls, metrics land in JSONL, and a SIGKILLed or stopped run resumes bit for bit.

Every run here uses the same tiny config with a 30-step schedule (shorter runs use stop_after), so
the in-process run and the subprocesses execute the same compiled programs (see train_helpers).
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from litejax.train.optimizer import lr_schedule
from litejax.train import loop as train_lib
from litejax.config import load_config
from litejax.train.metrics import read_metrics
from train_helpers import TINY, TINY_YAML, enable_compile_cache, subprocess_env

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

RUN = TINY + ['train.steps=30', 'train.eval_every=10', 'train.ckpt_every=10']
METRIC_KEYS = {'step', 'loss', 'aux_loss', 'z_loss', 'drop_fraction', 'tokens_per_second',
               'expert_load_entropy'}
enable_compile_cache()


def tiny_cfg(*extra):
  return load_config(TINY_YAML, RUN + list(extra))


@pytest.fixture(scope='module')
def full30(tmp_path_factory):
  """One uninterrupted 30-step run on the 8-device mesh, logging every step."""
  d = tmp_path_factory.mktemp('full30')
  result = train_lib.train(tiny_cfg(), ckpt_dir=d / 'ckpt', metrics_path=d / 'm.jsonl', quiet=True)
  return result, d


def test_init_model_is_the_step_0_state_of_train_seed():
  """One init convention: init_model(cfg, s) holds exactly the parameters (and router biases) of a fresh
  train state of `train.seed: s`, here created sharded over the 8-device mesh."""
  import jax
  from flax import nnx

  from litejax import sharding as shd
  from litejax.model.transformer import init_model
  from litejax.train import step as train_step
  from litejax.train.optimizer import make_optimizer
  cfg = tiny_cfg('train.seed=3')
  mesh = shd.make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.train)
  _, _, shardings = train_step.state_layout(cfg, mesh, tx)
  state = train_step.init_state(cfg, mesh, tx, shardings)
  _, params, extra = nnx.split(init_model(cfg, seed=3), nnx.Param, ...)
  for part, got in (('params', params), ('extra', extra)):
    want = jax.tree_util.tree_leaves_with_path(state[part])
    got = jax.tree_util.tree_leaves_with_path(got)
    assert [k for k, _ in got] == [k for k, _ in want], part
    for (k, a), (_, b) in zip(got, want):
      assert np.array_equal(np.asarray(a), np.asarray(b)), (part, jax.tree_util.keystr(k))


def test_schedule_warms_up_then_decays():
  tc = tiny_cfg('train.steps=100', 'train.warmup_steps=10', 'train.lr=0.001', 'train.min_lr_ratio=0.1').train
  sched = lr_schedule(tc)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(100)) == pytest.approx(1e-4)


def test_peak_flops_table():
  class Dev:
    device_kind = 'TPU v5 lite'
  assert train_lib.peak_flops_per_device(Dev()) == 197e12
  Dev.device_kind = 'cpu'
  assert train_lib.peak_flops_per_device(Dev()) is None


def test_30_steps_loss_falls_and_metrics_jsonl(full30):
  result, d = full30
  assert result.status == 'done' and result.step == 30
  records = read_metrics(d / 'm.jsonl')
  assert [r['step'] for r in records] == list(range(1, 31))
  for r in records:
    assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
    assert 0.0 <= r['drop_fraction'] <= 1.0 and 0.0 < r['expert_load_entropy'] <= 1.0
  assert all(r['tokens_per_second'] > 0 for r in records[1:])
  assert [r['step'] for r in records if 'val_loss' in r] == [10, 20, 30]
  first = np.mean([r['loss'] for r in records[:5]])
  last = np.mean([r['loss'] for r in records[-5:]])
  assert last < first - 1.0, (first, last)   # byte-level CE starts near ln 256 = 5.5
  assert result.val_loss < records[0]['loss']
  assert (d / 'm.png').stat().st_size > 1000


KILL_SCRIPT = textwrap.dedent('''
    import os, pathlib, signal, sys, time
    from litejax.train import loop as train_lib
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

    train_lib.train(cfg, ckpt_dir=ckpt, metrics_path=sys.argv[3], quiet=True, stop_after=20,
                    on_step=kill_after_15)
''')


def test_sigkill_resume_is_bit_exact(full30, tmp_path):
  """20 steps with a checkpoint at 10, SIGKILL after 15, resume to 20: steps 11-20 match exactly."""
  proc = subprocess.run(
      [sys.executable, '-c', KILL_SCRIPT, str(TINY_YAML), str(tmp_path / 'ckpt'), str(tmp_path / 'm.jsonl'),
       *RUN], env=subprocess_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert [r['step'] for r in read_metrics(tmp_path / 'm.jsonl')][-1] == 15

  resumed = train_lib.train(tiny_cfg(), ckpt_dir=tmp_path / 'ckpt', resume=True, stop_after=20,
                            metrics_path=tmp_path / 'm.jsonl', quiet=True)
  assert resumed.status == 'stopped' and resumed.step == 20
  assert [r['step'] for r in resumed.history] == list(range(11, 21))   # restarted from step 10
  want = {r['step']: r['loss'] for r in full30[0].history if 10 < r['step'] <= 20}
  got = {r['step']: r['loss'] for r in resumed.history}
  assert got == want      # bit for bit: float equality of every loss
  # Steps 11-15 the killed run logged were replaced: 1..20 once each.
  assert [r['step'] for r in read_metrics(tmp_path / 'm.jsonl')] == list(range(1, 21))


def test_cli_stop_after_then_resume(full30, tmp_path):
  """`litejax train --stop-after 3`, then a resume to step 6: the uninterrupted run's losses."""
  cmd = [sys.executable, '-m', 'litejax.cli', 'train', '--devices', '8', '--quiet', '--stop-after', '3',
         '--config', str(TINY_YAML), '--ckpt-dir', 'ck', '--metrics', 'm.jsonl',
         *[a for o in RUN for a in ('--set', o)]]
  p = subprocess.run(cmd, env=subprocess_env(None), capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  assert (tmp_path / 'm.png').exists()
  # The resume runs in this process (same 8-device programs): the CLI's --resume is this call.
  train_lib.train(tiny_cfg(), ckpt_dir=tmp_path / 'ck', resume=True, stop_after=6,
                  metrics_path=tmp_path / 'm.jsonl', quiet=True)
  got = [(r['step'], r['loss']) for r in read_metrics(tmp_path / 'm.jsonl')]
  want = [(r['step'], r['loss']) for r in full30[0].history[:6]]
  assert got == want


@pytest.fixture(scope='module')
def run_to_4(full30, tmp_path_factory):
  """Steps 1-4 of the 30-step run with checkpoints at 2 and 4 (full30 compiled the programs)."""
  d = tmp_path_factory.mktemp('run4')
  train_lib.train(tiny_cfg('train.ckpt_every=2'), ckpt_dir=d / 'ck', metrics_path=d / 'm.jsonl', stop_after=4,
                  quiet=True)
  return d


def _cli_train(d, *flags):
  from litejax import cli
  return cli.main(['train', '--config', str(TINY_YAML), '--devices', '8', '--quiet', '--ckpt-dir', str(d / 'ck'),
                   '--metrics', str(d / 'm.jsonl'), *[a for o in RUN + ['train.ckpt_every=2'] for a in ('--set', o)],
                   *flags])


@pytest.mark.parametrize('how', ['flip', 'truncate', 'missing'])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_goes_past_it(full30, run_to_4, tmp_path, capsys, how):
  """`litejax train --resume` over a damaged step 4: it resumes from step 2, moves step 4 aside to a name that
  says why, saves step 4 afresh on its way to 6, logs each step once, and its losses are the uninterrupted run's."""
  import shutil

  from fault_helpers import damage
  from litejax.train import run_folder
  shutil.copytree(run_to_4, tmp_path, dirs_exist_ok=True)
  ck = tmp_path / 'ck'
  damage(max((p for p in (ck / '4' / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size), how)
  assert _cli_train(tmp_path, '--resume', '--stop-after', '6') == 0
  err = capsys.readouterr().err
  why = {'flip': 'sha256-differs', 'truncate': 'truncated', 'missing': 'file-missing'}[how]
  assert 'Traceback' not in err and f'moved the damaged checkpoint {ck}/4 aside to {ck}/4.corrupt-{why}' in err, err
  assert (ck / f'4.corrupt-{why}').is_dir() and run_folder.checkpoint_steps(ck) == [2, 4, 6]
  got = [(r['step'], r['loss']) for r in read_metrics(tmp_path / 'm.jsonl')]
  assert got == [(r['step'], r['loss']) for r in full30[0].history[:6]]    # bit for bit, each step once


def _wait_for(condition, proc, timeout_s=300.0, poll_s=0.001):
  """Polls `condition()` until true; False if `proc` exited first. Raises after timeout_s."""
  import time
  deadline = time.monotonic() + timeout_s
  while not condition():
    if proc.poll() is not None:
      return False
    if time.monotonic() > deadline:
      proc.kill()
      raise TimeoutError('the training run did not get there')
    time.sleep(poll_s)
  return True


def test_preempted_five_times_with_resume_if_possible_is_bit_exact(full30, tmp_path):
  """As experiments/pod/* reruns its command after a preemption: `litejax train --resume-if-possible` is
  SIGKILLed at 5 random steps (a checkpoint step's kill lands mid-save: Orbax's temporary folder there, or the
  step committed but not yet digested) and rerun each time; then it runs to step 20. The losses are the
  uninterrupted run's bit for bit and metrics.jsonl holds steps 1-20 once each."""
  import os
  import signal

  from litejax.train.digest import DIGEST_FILE
  ck, metrics = tmp_path / 'ck', tmp_path / 'm.jsonl'
  cmd = [sys.executable, '-m', 'litejax.cli', 'train', '--devices', '8', '--quiet', '--resume-if-possible',
         '--stop-after', '20', '--config', str(TINY_YAML), '--ckpt-dir', str(ck), '--metrics', str(metrics),
         *[a for o in RUN + ['train.ckpt_every=3'] for a in ('--set', o)]]
  kills = sorted(int(s) for s in np.random.default_rng(0).choice(np.arange(2, 20), 5, replace=False))
  assert any(k % 3 == 0 for k in kills), kills           # at least one kill at a save

  def logged(step):
    try:
      return any(r['step'] >= step for r in read_metrics(metrics)[-2:])
    except (OSError, ValueError):
      return False

  def mid_save(step):
    if any(ck.glob(f'{step}.orbax-checkpoint-tmp*')):
      return 'writing'
    return 'undigested' if (ck / str(step)).is_dir() and not (ck / str(step) / DIGEST_FILE).exists() else None

  hit = {}
  for step in kills:
    proc = subprocess.Popen(cmd, env=subprocess_env(None), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert _wait_for(lambda: logged(step), proc, poll_s=0.005), proc.stderr.read()[-3000:]
    if step % 3 == 0:
      _wait_for(lambda: mid_save(step) or (ck / str(step) / DIGEST_FILE).exists(), proc)
      hit[step] = mid_save(step) or 'after the save'
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
  print('killed at steps', kills, '; at the saves:', hit)
  assert any(h in ('writing', 'undigested') for h in hit.values()), hit
  p = subprocess.run(cmd, env=subprocess_env(None), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  got = [(r['step'], r['loss']) for r in read_metrics(metrics)]
  assert got == [(r['step'], r['loss']) for r in full30[0].history[:20]], (kills, hit)
