"""The run folder (issue 14): a lock a killed process does not leave stuck, and what --resume,
--resume-if-possible and --overwrite do to a previous run, through the real `litejax train`."""
import json
import os
import signal
import subprocess
import sys

import pytest

from litejax import cli
from litejax.train import run_folder
from litejax.config import InputError
from train_helpers import TINY, TINY_YAML, enable_compile_cache

# Compiles models: outside the fast loop (`pytest -m "not slow"`); CI runs everything.
pytestmark = pytest.mark.slow

enable_compile_cache()
HOLD = ('import sys, time; from litejax.train import run_folder as r; '
        'r.RunLock(r.make_paths(sys.argv[1], None)).acquire(); print("locked", flush=True); time.sleep(60)')


def test_second_process_is_refused_until_the_holder_is_killed(tmp_path):
  ckpt = str(tmp_path / 'ckpt')
  holder = subprocess.Popen([sys.executable, '-c', HOLD, ckpt], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(InputError, match=rf'ckpt.lock: another process \(pid {holder.pid}\) is training'):
      run_folder.RunLock(run_folder.make_paths(ckpt, None)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with run_folder.RunLock(run_folder.make_paths(ckpt, None)) as lock:   # the kernel dropped the dead one's lock
    assert lock.path.read_text().strip() == str(os.getpid())


def _train(tmp_path, *flags):
  args = ['train', '--config', str(TINY_YAML), '--devices', '8', '--quiet', '--ckpt-dir', str(tmp_path / 'ck'),
          '--metrics', str(tmp_path / 'm.jsonl'), *[a for o in TINY + ['train.ckpt_every=2'] for a in ('--set', o)],
          *flags]
  return cli.main(args)


def _steps(tmp_path):
  return [json.loads(line)['step'] for line in (tmp_path / 'm.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_resume_if_possible_then_resume_then_overwrite(tmp_path, capsys):
  assert _train(tmp_path, '--resume-if-possible', '--stop-after', '2') == 0      # nothing there: fresh
  assert run_folder.checkpoint_steps(tmp_path / 'ck') == [2] and _steps(tmp_path) == [1, 2]
  assert _train(tmp_path, '--stop-after', '4') == 2                              # a previous run: refused
  assert 'pass --resume to continue it, --overwrite to replace it' in capsys.readouterr().err
  assert _train(tmp_path, '--resume-if-possible', '--stop-after', '3') == 0      # preempted job reruns
  assert _train(tmp_path, '--resume', '--stop-after', '4') == 0
  assert _steps(tmp_path) == [1, 2, 3, 4]                                       # appended, none twice
  assert run_folder.checkpoint_steps(tmp_path / 'ck') == [2, 3, 4]
  assert _train(tmp_path, '--overwrite', '--stop-after', '1') == 0
  assert run_folder.checkpoint_steps(tmp_path / 'ck') == [1] and _steps(tmp_path) == [1]
