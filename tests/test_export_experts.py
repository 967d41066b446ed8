"""`litejax export-experts`: a checkpoint's experts (unscanned and scanned models) land in the store
unchanged; --init writes the configured store; bad input fails before anything is written."""
import json
import os

import jax
import numpy as np
import pytest

from litejax.train.checkpoint import Checkpointer
from litejax.cli import main
from litejax.config import load_config
from litejax.inference.store import layout
from litejax.inference.store.disk import ExpertStore
from store_helpers import SMALL, STORE_1B, small_cfg


def save_checkpoint(cfg, ckpt_dir):
  """A checkpoint of random params laid out as the trainer saves them ({'params': nnx.State, ...}), built
  from the abstract model so nothing is compiled."""
  from flax import nnx

  from litejax.model.transformer import abstract_model
  rng = np.random.default_rng(0)
  params = nnx.state(abstract_model(cfg), nnx.Param)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), params)
  state = {'params': params, 'step': np.zeros((), np.int32)}
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  ckpt.save(0, state, {'config': cfg.to_dict()})
  ckpt.close()
  return state


def expert_param(state, cfg, layer, name):
  p = state['params']
  if cfg.model.scan_layers:
    period = max(cfg.model.moe_every, 1)
    return np.asarray(p['periods']['layers'][layer % period]['ffn'][name][...])[layer // period]
  return np.asarray(p['blocks'][layer]['ffn'][name][...])


@pytest.mark.parametrize('extra', [[], ['model.scan_layers=true', 'model.moe_every=2', 'model.num_layers=4']],
                         ids=['blocks', 'scanned'])
def test_checkpoint_experts_land_unchanged(tmp_path, extra, capsys):
  cfg = small_cfg(*extra)
  state = save_checkpoint(cfg, tmp_path / 'ckpt')
  assert main(['export-experts', '--ckpt-dir', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'store'),
               '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['layers'] == layout.moe_layers(cfg) and out['source']['step'] == 0
  store = ExpertStore.open(str(tmp_path / 'store'), cfg)
  ids = list(range(cfg.moe.experts_total))
  for layer in store.layers:
    got = store.read_experts(layer, ids)
    for name in layout.array_names(cfg):
      assert np.array_equal(got[name], expert_param(state, cfg, layer, name)), (layer, name)
  if extra:
    assert store.layers == [1, 3]


def test_damaged_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
  """export-experts reads through the checkpoint reader: its digest check names the damaged file."""
  cfg = small_cfg()
  save_checkpoint(cfg, tmp_path / 'ckpt')
  f = max((p for p in (tmp_path / 'ckpt' / '0' / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))
  out = tmp_path / 'store'
  assert main(['export-experts', '--ckpt-dir', str(tmp_path / 'ckpt'), '--step', '0', '--out', str(out)]) == 2
  err = capsys.readouterr().err
  assert f'{f}: SHA-256 differs' in err and len(err.strip().splitlines()) == 1
  assert not out.exists()


@pytest.mark.parametrize('how', ['flip', 'truncate', 'missing'])
def test_damaged_newest_checkpoint_exports_the_previous_step(tmp_path, capsys, how):
  """Without --step, a damaged newest step is skipped (named on stderr and in the manifest's source) for the
  previous intact one, and the checkpoint folder is left as it was (a reader renames nothing)."""
  import shutil

  from fault_helpers import damage
  cfg = small_cfg()
  state = save_checkpoint(cfg, tmp_path / 'ckpt')
  shutil.copytree(tmp_path / 'ckpt' / '0', tmp_path / 'ckpt' / '3')    # a newer step, then damaged
  f = max((p for p in (tmp_path / 'ckpt' / '3' / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  damage(f, how)
  assert main(['export-experts', '--ckpt-dir', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'store'),
               '--json']) == 0
  out, err = capsys.readouterr()
  assert err.startswith(f'litejax export-experts: warning: checkpoint {tmp_path}/ckpt/3 is unreadable '
                        f'(CheckpointCorruptError: {f}') and len(err.splitlines()) == 1, err
  source = json.loads(out)['source']
  assert source['step'] == 0 and [s['step'] for s in source['skipped']] == [3] and str(f) in source['skipped'][0]['why']
  assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == ['0', '3']
  got = ExpertStore.open(str(tmp_path / 'store'), cfg).read_experts(0, [1])['w_in'][0]
  assert np.array_equal(got, expert_param(state, cfg, 0, 'w_in')[1])


def test_init_writes_the_configured_store_and_refuses_to_overwrite(tmp_path, capsys):
  cfg_args = ['--config', STORE_1B] + sum((['--set', s] for s in SMALL), [])
  out = str(tmp_path / 'store')
  cfg_args += ['--block-mib', '0.01']     # blocks of 6 experts, the last one short
  assert main(['export-experts', '--init', '--seed', '2', '--out', out] + cfg_args) == 0
  store = ExpertStore.open(out, small_cfg())
  assert store.manifest['source'] == {'kind': 'init', 'seed': 2}
  first = store.read_experts(1, [5])['w_in']
  capsys.readouterr()
  assert main(['export-experts', '--init', '--seed', '3', '--out', out] + cfg_args) == 2
  assert 'pass --overwrite' in capsys.readouterr().err
  assert np.array_equal(ExpertStore.open(out).read_experts(1, [5])['w_in'], first)
  assert main(['export-experts', '--init', '--seed', '3', '--out', out, '--overwrite'] + cfg_args) == 0
  assert not np.array_equal(ExpertStore.open(out).read_experts(1, [5])['w_in'], first)


@pytest.mark.parametrize('args, words', [
    (['--out', 'S'], 'exactly one of --ckpt-dir D or --init'),
    (['--out', 'S', '--init', '--ckpt-dir', 'D'], 'exactly one of --ckpt-dir D or --init'),
    (['--out', 'S', '--init'], '--config is required'),
    (['--out', 'S', '--ckpt-dir', 'D', '--config', STORE_1B], 'drop --config'),
    (['--out', 'S', '--init', '--config', STORE_1B, '--block-mib', '0'], '--block-mib: must be > 0'),
    (['--out', 'S', '--init', '--config', STORE_1B, '--set', 'moe.k_expert=99'], 'moe.k_expert'),
    (['--out', 'S', '--init', '--config', STORE_1B, '--set', 'model.moe_every=0'], 'no MoE layer'),
    (['--out', 'S', '--ckpt-dir', 'no/such/dir'], 'no such directory'),
])
def test_bad_input_writes_nothing(tmp_path, monkeypatch, capsys, args, words):
  monkeypatch.chdir(tmp_path)
  args = [a if a != STORE_1B else str(layout_root() / STORE_1B) for a in args]
  assert main(['export-experts'] + args) == 2
  assert words in capsys.readouterr().err
  assert not (tmp_path / 'S').exists() and not (tmp_path / 'no').exists()


def layout_root():
  import pathlib
  return pathlib.Path(__file__).resolve().parents[1]


def test_store_1b_config_is_a_billion_parameters_in_hierarchical_experts():
  from litejax.model import bounds
  cfg = load_config(layout_root() / STORE_1B)
  m = cfg.moe
  assert (m.num_tiers, m.groups_per_tier, m.experts_per_group) == (16, 16, 64) and m.experts_total == 16384
  assert cfg.model.num_moe_layers == 4 and m.k_tier == 1 and m.k_group == 2
  counts = bounds.summary(cfg, 1)
  assert counts['params_total'] == 1_216_717_952 and counts['params_expert_total'] == 1_207_959_552
  assert layout.expert_bytes(cfg) == 73_728


def _assert_complete(out, cfg, state):
  store = ExpertStore.open(str(out), cfg)
  assert store.damaged_chunks() == []
  ids = list(range(cfg.moe.experts_total))
  for layer in store.layers:
    got = store.read_experts(layer, ids)
    for name in layout.array_names(cfg):
      assert np.array_equal(got[name], expert_param(state, cfg, layer, name)), (out, layer, name)


@pytest.mark.slow
def test_killed_exports_never_leave_a_store_that_opens_and_a_rerun_finishes(tmp_path, capsys):
  """SIGKILL at 10 random moments of `export-experts --ckpt-dir` (tests/export_kill_worker.py): a folder either
  holds no store that opens or a complete, intact one; rerunning the command finishes it or refuses naming
  --overwrite, and with --overwrite it does (a killed export leaves no lock behind)."""
  import pathlib
  import subprocess
  import sys

  from litejax.inference.store.layout import ExpertStoreError
  from train_helpers import subprocess_env
  cfg = small_cfg()
  state = save_checkpoint(cfg, tmp_path / 'ckpt')
  worker = pathlib.Path(__file__).parent / 'export_kill_worker.py'
  p = subprocess.run([sys.executable, str(worker), str(tmp_path / 'ckpt'), str(tmp_path / 'runs'), '10'],
                     env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  _assert_complete(tmp_path / 'runs' / 'reference' / 'store', cfg, state)
  outcomes = []
  for seed in range(10):
    run = tmp_path / 'runs' / str(seed)
    out = run / 'store'
    try:
      ExpertStore.open(str(out), cfg)
      opens = True
    except ExpertStoreError:
      opens = False
    if opens:
      _assert_complete(out, cfg, state)          # whole, never a half-store that passes as one
    else:
      assert not (run / 'finished').exists()
    outcomes.append('complete' if opens else 'incomplete' if out.is_dir() and any(out.iterdir()) else 'empty')
    command = ['export-experts', '--ckpt-dir', str(tmp_path / 'ckpt'), '--out', str(out)]
    rc = main(command)
    err = capsys.readouterr().err
    assert rc == 0 or (rc == 2 and 'pass --overwrite' in err), (seed, rc, err)
    if rc == 2:
      assert main(command + ['--overwrite']) == 0, capsys.readouterr().err
    _assert_complete(out, cfg, state)
  print('outcomes of the 10 kills:', outcomes)


def test_full_disk_is_one_line_and_leaves_no_store_that_opens(tmp_path, capsys, monkeypatch):
  """ENOSPC injected at the writer's third array write: exit 1, one line; the folder holds no manifest, so
  neither `generate --store` nor `--verify` takes it for a store; rerunning needs --overwrite and finishes."""
  import errno

  from litejax.inference.store.layout import ExpertStoreError
  from litejax.inference.store.writer import StoreWriter
  cfg = small_cfg()
  state = save_checkpoint(cfg, tmp_path / 'ckpt')
  real, calls = StoreWriter.write_array, []

  def disk_fills_up(self, *args):
    calls.append(args)
    if len(calls) >= 3:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(self, *args)

  monkeypatch.setattr(StoreWriter, 'write_array', disk_fills_up)
  command = ['export-experts', '--ckpt-dir', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'store')]
  assert main(command) == 1
  err = capsys.readouterr().err
  assert err.splitlines() == [f'litejax export-experts: writing expert store {tmp_path}/store failed (layer 0 experts '
                              '0..15): no space left on device; the store is incomplete (no manifest.json, so nothing '
                              'opens it): free space and rerun with --overwrite'], err
  with pytest.raises(ExpertStoreError, match='no manifest.json'):
    ExpertStore.open(str(tmp_path / 'store'))
  assert main(['export-experts', '--verify', str(tmp_path / 'store')]) == 2
  monkeypatch.undo()
  capsys.readouterr()
  assert main(command) == 2
  assert 'holds an incomplete expert store (an export that did not finish: no manifest.json); pass --overwrite' \
      in capsys.readouterr().err
  assert main(command + ['--overwrite']) == 0
  _assert_complete(tmp_path / 'store', cfg, state)


def test_second_export_into_the_same_folder_is_refused(tmp_path, capsys):
  """While one export holds STORE/export.lock, a second (even with --overwrite) refuses and writes nothing;
  once the first is done (or killed: the kernel drops its flock), the folder is free."""
  from litejax.inference.store.writer import StoreWriter
  cfg = small_cfg()
  state = save_checkpoint(cfg, tmp_path / 'ckpt')
  first = StoreWriter(str(tmp_path / 'store'), cfg)
  before = sorted(str(p) for p in (tmp_path / 'store').rglob('*'))
  command = ['export-experts', '--ckpt-dir', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'store')]
  for extra in ([], ['--overwrite']):
    assert main(command + extra) == 2
    assert capsys.readouterr().err == (f'litejax export-experts: --out {tmp_path}/store: another export-experts '
                                       f'(pid {os.getpid()}) is writing this store; wait for it or choose another '
                                       '--out\n')
  assert sorted(str(p) for p in (tmp_path / 'store').rglob('*')) == before
  first.close()
  assert main(command + ['--overwrite']) == 0
  _assert_complete(tmp_path / 'store', cfg, state)
