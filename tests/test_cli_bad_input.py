"""Bad input, systematically: every command, every kind of bad value -> exit 2, one line on stderr naming
the field or path and the constraint, no traceback, nothing written (issue 14).

Cases run in-process through `litejax.cli.main` (a subprocess costs seconds of JAX import each), in a
fresh working folder whose tree is compared before and after. docs/training.md quotes the count.
"""
import os
import pathlib

import numpy as np
import pytest

from litejax import cli, env
from litejax.config import load_config

TINY = ['--set', 'model.num_layers=1', '--set', 'model.d_model=32', '--set', 'model.num_heads=2',
        '--set', 'model.num_kv_heads=2', '--set', 'model.seq_len=32', '--set', 'moe.d_expert=32',
        '--set', 'train.batch_size=8']


def _files(tmp):
  """Fixture files the cases point at; created before the snapshot."""
  (tmp / 'random.yaml').write_bytes(np.random.default_rng(0).bytes(512))
  (tmp / 'latin1.yaml').write_bytes('model:\n  d_model: 64   # d\xe9j\xe0 vu\n'.encode('latin-1'))
  (tmp / 'wrong_type.yaml').write_text('model:\n  d_model: sixty-four\n')
  (tmp / 'list.yaml').write_text('- model\n- moe\n')
  (tmp / 'section.yaml').write_text('optimizer:\n  lr: 0.1\n')
  (tmp / 'key.yaml').write_text('model:\n  width: 64\n')
  (tmp / 'broken.yaml').write_text('model: [d_model: 64\n')
  (tmp / 'scalar_section.yaml').write_text('model: 3\n')
  (tmp / 'odd.bin').write_bytes(b'\x01\x00\x02')            # 3 bytes of uint16 tokens
  (tmp / 'empty_folder').mkdir()
  (tmp / 'a_file').write_text('not a folder\n')
  (tmp / 'a_folder.jsonl').mkdir()
  (tmp / 'big.bin').write_bytes(np.full(4096, 300, np.uint16).tobytes())   # token 300 >= vocab 256
  _other_config_checkpoint(tmp / 'other_ckpt')
  (tmp / 'prev' / 'ckpt' / '3').mkdir(parents=True)         # a previous run's committed step
  (tmp / 'no_prompts.txt').write_text('')
  (tmp / 'binary.txt').write_bytes(b'In the\x00\x01\x02 beginning\n')
  (tmp / 'latin1.txt').write_bytes('d\xe9j\xe0 vu\n'.encode('latin-1'))
  tiny = load_config('tiny', TINY[1::2])
  _checkpoint(tmp / 'ck', tiny)
  _checkpoint(tmp / 'ck_no_params', tiny, with_params=False)
  _checkpoint(tmp / 'ck_dense', load_config('tiny_dense', TINY[1::2]))
  _store(tmp / 'store')


def _checkpoint(path, cfg, with_params=True):
  """A checkpoint of `cfg` laid out as the trainer saves it (zero parameters, nothing compiled), or one that
  holds no parameters."""
  import jax
  from flax import nnx

  from litejax.model.transformer import abstract_model
  from litejax.train.checkpoint import Checkpointer
  _, params, extra = nnx.split(abstract_model(cfg), nnx.Param, ...)
  zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)  # noqa: E731
  state = {'params': zeros(params), 'extra': zeros(extra)} if with_params else {}
  ck = Checkpointer(path, async_save=False)
  ck.save(1, {**state, 'step': np.int32(1)}, {'config': cfg.to_dict()})
  ck.close()


def _store(path):
  """A complete expert store of the shrunk store_1b config (2 routing tiers): another config than `ck`'s."""
  from litejax.inference.store import layout
  from litejax.inference.store.writer import StoreWriter
  from store_helpers import small_cfg
  cfg = small_cfg()
  w = StoreWriter(str(path), cfg)
  for layer in layout.moe_layers(cfg):
    w.write(layer, 0, {n: np.zeros((cfg.moe.experts_total, *s), np.float32) for n, s in layout.expert_shapes(cfg).items()})
  w.finish({'kind': 'init', 'seed': 0})


def _other_config_checkpoint(path):
  """A real (Orbax) checkpoint whose state another config built."""
  from litejax.train.checkpoint import Checkpointer
  ck = Checkpointer(path, async_save=False)
  ck.save(3, {'params': {'w': np.zeros((3, 5), np.float32)}, 'step': np.int32(3)}, {'config': {}})
  ck.close()


BAD_CONFIGS = [
    (['--config', 'random.yaml'], 'random.yaml: not a UTF-8'),
    (['--config', 'latin1.yaml'], 'latin1.yaml: not a UTF-8'),
    (['--config', 'wrong_type.yaml'], 'model.d_model: must be an integer'),
    (['--config', 'list.yaml'], 'top level must be a mapping'),
    (['--config', 'section.yaml'], 'optimizer: unknown section'),
    (['--config', 'key.yaml'], 'model.width: unknown key'),
    (['--config', 'broken.yaml'], 'broken.yaml: not valid YAML'),
    (['--config', 'scalar_section.yaml'], 'model: must be a mapping'),
    (['--config', 'missing.yaml'], "'missing.yaml' does not exist"),
    (['--config', 'empty_folder'], 'is not a file'),
    (['--config', 'tiny', '--set', 'model.num_layers=1000000000'], 'model.num_layers: must be <= 4096'),
    (['--config', 'tiny', '--set', 'train.batch_size=0'], 'train.batch_size: must be > 0'),
    (['--config', 'tiny', '--set', 'moe.d_expert=10000000000000'], 'moe.d_expert: must be at most'),
    (['--config', 'tiny', '--set', 'moe.capacity_factor=.nan'], 'moe.capacity_factor: must be finite'),
    (['--config', 'tiny', '--set', 'train.lr=-1'], 'train.lr: must be > 0'),
    (['--config', 'tiny', '--set', 'moe.k_expert=99'], 'moe.k_expert (99) must be <='),
    (['--config', 'tiny', '--set', 'model.dtype=float8'], 'model.dtype: must be one of'),
    (['--config', 'tiny', '--set', 'lr=3'], 'must look like section.key'),
    (['--config', 'tiny', '--set', 'model.d_model'], 'expected section.key=value'),
]

GEN = ['--ckpt-dir', 'ck', '--prompt', 'In the']
STORE = ['--store', 'store', '--prompt', 'In the']

CASES = (
    [('params', a, m) for a, m in BAD_CONFIGS] +
    [('bound', a, m) for a, m in BAD_CONFIGS[:4] + BAD_CONFIGS[10:12]] +
    [('plan', a, m) for a, m in BAD_CONFIGS[:4] + BAD_CONFIGS[10:12]] +
    [('train', a + ['--devices', '8'], m) for a, m in BAD_CONFIGS[:4] + BAD_CONFIGS[10:12]] + [
        ('params', ['--config', 'tiny', '--tokens-per-group', '0'], '--tokens-per-group: must be >= 1'),
        ('params', [], 'the following arguments are required: --config'),
        ('bound', ['--config', 'tiny', '--devices', '0'], '--devices: must be >= 1'),
        ('bound', ['--config', 'tiny', '--batch', 'many'], "--batch: must be an integer >= 1, got 'many'"),
        ('plan', ['--config', 'tiny', '--generation', 'v99'], 'v99'),
        ('plan', ['--config', 'tiny', '--batch', '-8'], '--batch: must be >= 1'),
        ('calibrate', ['--repeats', '0'], '--repeats: must be >= 1'),
        ('calibrate', ['--batch', '-1'], '--batch: must be >= 1'),
        ('calibrate', ['--config', 'tiny'], 'unrecognized arguments: --config'),
        ('train', [*TINY, '--steps', '0'], '--steps: must be >= 1'),
        ('train', [*TINY, '--devices', '0'], '--devices: must be >= 1'),
        ('train', [*TINY, '--set', 'mesh.data=3', '--set', 'mesh.expert=1'], 'mesh: data*expert*tensor'),
        ('train', [*TINY, '--set', 'train.batch_size=12'], 'batch size 12 is not divisible'),
        ('train', [*TINY, '--data', 'odd.bin'], 'odd.bin: size 3 bytes is not a multiple of 2'),
        ('train', [*TINY, '--data', 'empty_folder'], 'empty_folder: folder contains no .txt files'),
        ('train', [*TINY, '--data', 'nowhere'], '--data path does not exist: nowhere'),
        ('train', [*TINY, '--data', 'big.bin'], 'token ids must be in [0, 256)'),
        ('train', [*TINY, '--ckpt-dir', 'a_file'], '--ckpt-dir a_file: a_file is a file'),
        ('train', [*TINY, '--ckpt-dir', 'a_file/ckpt'], '--ckpt-dir a_file/ckpt: a_file is a file'),
        ('train', [*TINY, '--metrics', 'a_folder.jsonl'], '--metrics a_folder.jsonl: is a folder'),
        ('train', [*TINY, '--ckpt-dir', 'other_ckpt', '--resume'], 'other_ckpt/3: the current config has params/'),
        ('train', [*TINY, '--ckpt-dir', 'empty_folder', '--resume'], 'no checkpoint to resume in empty_folder'),
        ('train', [*TINY, '--ckpt-dir', 'prev/ckpt', '--metrics', 'prev/m.jsonl'],
         'prev/ckpt hold a previous run (checkpoints up to step 3); pass --resume'),
        ('train', [*TINY, '--ckpt-dir', 'prev/ckpt', '--overwrite', '--data', 'odd.bin'], 'odd.bin: size 3'),
        ('train', [*TINY, '--resume', '--overwrite'], 'not allowed with argument'),
        ('train', [*TINY, '--no-ckpt', '--resume'], '--resume: needs checkpoints'),
        ('generate', ['--ckpt-dir', 'ck', '--prompt', ''], '--prompt: must not be empty'),
        ('generate', ['--ckpt-dir', 'ck', '--prompts', 'no_prompts.txt'], '--prompts no_prompts.txt: holds no prompt'),
        ('generate', ['--ckpt-dir', 'ck', '--prompts', 'binary.txt'], '--prompts binary.txt: a binary file'),
        ('generate', ['--ckpt-dir', 'ck', '--prompts', 'latin1.txt'], '--prompts latin1.txt: not UTF-8 text (byte 1)'),
        ('generate', ['--ckpt-dir', 'ck', '--prompts', 'nowhere.txt'], '--prompts nowhere.txt: no such file'),
        ('generate', [*GEN, '--max-new-tokens', '0'], '--max-new-tokens: must be >= 1, got 0'),
        ('generate', [*GEN, '--max-new-tokens', '16777211'], '--max-new-tokens: the prompt (6 tokens) plus '
         '16,777,211 new tokens pass the 16,777,216 positions the model can address'),
        ('generate', [*GEN, '--temperature', '-0.5'], '--temperature: must be >= 0'),
        ('generate', [*GEN, '--top-p', '0'], '--top-p: must be in (0, 1]'),
        ('generate', [*GEN, '--top-p', '1.5'], '--top-p: must be in (0, 1]'),
        ('generate', [*GEN, '--top-k', '-1'], '--top-k: must be >= 0'),
        ('generate', [*GEN, '--devices', '0'], '--devices: must be >= 1'),
        ('generate', [*STORE, '--device-slots', '0'], '--device-slots: must be a fraction in (0, 1], got 0.0'),
        ('generate', [*STORE, '--device-slots', '1.5'], '--device-slots: must be a fraction in (0, 1], got 1.5'),
        ('generate', [*STORE, '--ckpt-dir', 'ck'], 'expert store store was written for another config (model.'),
        ('generate', ['--ckpt-dir', 'ck_no_params', '--prompt', 'x'], 'ck_no_params/1: the current config has params/'),
        ('generate', [*STORE, '--latency-budget-ms', '0'], '--latency-budget-ms: must be > 0, got 0.0'),
        ('generate', [*STORE, '--latency-budget-ms', '-5'], '--latency-budget-ms: must be > 0, got -5.0'),
        ('generate', [*STORE, '--latency-budget-ms', '5', '--set', 'store.placement=hot'],
         'store.placement: needs one class per routing tier (moe.num_tiers=2), got 1'),
        ('generate', [*STORE, '--latency-budget-ms', '5', '--set', 'store.placement=hot,lukewarm'],
         'store.placement: classes must be among'),
        ('export-experts', ['--ckpt-dir', 'ck', '--out', 'store'], '--out store: already holds an expert store; '
         'pass --overwrite'),
        ('export-experts', ['--ckpt-dir', 'ck', '--out', 'a_file'], '--out a_file: exists and is not a directory'),
        ('export-experts', ['--ckpt-dir', 'ck', '--out', 'prev'], '--out prev: is not empty and holds no expert store'),
        ('export-experts', ['--ckpt-dir', 'ck_dense', '--out', 'S'], '--ckpt-dir ck_dense: checkpoint step 1 is of a '
         'dense model (model.moe_every=0): it has no routed experts to export'),
        ('export-experts', ['--ckpt-dir', 'empty_folder', '--out', 'S'], '--ckpt-dir empty_folder: holds no checkpoint'),
        ('export-experts', ['--ckpt-dir', 'ck', '--step', '7', '--out', 'S'], 'holds no step 7 (it has [1])'),
        ('export-experts', ['--verify', 'prev'], 'expert store prev: no manifest.json'),
        ('export-experts', ['--verify', 'store', '--out', 'S'], '--verify STORE: writes nothing; drop --out'),
    ])


def _snapshot(root: pathlib.Path):
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob('*')}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp('bad_input')
  _files(d)
  return d


@pytest.mark.parametrize('command,argv,message', CASES,
                         ids=[f'{c}-{i}' for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_clear_line(workdir, monkeypatch, capsys, command, argv, message):
  monkeypatch.chdir(workdir)
  before = _snapshot(workdir)
  try:
    rc = cli.main([command, *argv])
  except SystemExit as exited:     # argparse's own errors
    rc = exited.code
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2, err
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith('litejax'), lines[0]
  assert message in lines[0], lines[0]
  assert _snapshot(workdir) == before, 'a rejected command wrote or deleted something'
  assert not (workdir / 'runs').exists()


def test_case_count_matches_readme(repo_root):
  """docs/training.md states how many cases are tried; keep it in step with this table."""
  text = (repo_root / 'docs' / 'training.md').read_text()
  assert f'{len(CASES)} bad-input cases' in text, len(CASES)


def test_libtpu_quiet_settings_only_without_a_tpu(monkeypatch):
  for k in ('TPU_SKIP_MDS_QUERY', 'TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'ALLOW_MULTIPLE_LIBTPU_LOAD'):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(env.glob, 'glob', lambda pattern: [])        # no PCI devices: a CPU machine
  env.quiet_libtpu()
  assert os.environ['TPU_SKIP_MDS_QUERY'] == '1' and os.environ['TPU_WORKER_HOSTNAMES'] == 'localhost'


def test_no_libtpu_noise_on_cpu(tmp_path):
  """With libtpu installed and no TPU, a command that starts JAX's backends prints only its own line."""
  import importlib.util
  import subprocess
  import sys
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu (the tpu extra) is not installed')
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'JAX_PLATFORMS', 'ALLOW_MULTIPLE'))}
  # train opens the devices (the mesh) before it reads --data.
  p = subprocess.run([sys.executable, '-m', 'litejax.cli', 'train', '--devices', '1', '--data', 'nowhere'], env=env,
                     cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and p.stderr == 'litejax train: --data path does not exist: nowhere\n', p.stderr
