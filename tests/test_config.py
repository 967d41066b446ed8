"""Config loading, overrides and validation."""
import dataclasses

import pytest

from conftest import CONFIG_DIR, all_config_files
from litejax.config import Config, ConfigError
from litejax.model.moe.capacity import capacity
from litejax.config import from_dict, load_config, parse_overrides
from litejax.model.moe.capacity import resolve_dispatch


@pytest.mark.parametrize('path', all_config_files(), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
  cfg = load_config(path)
  assert cfg.moe.k_active >= 1 and cfg.model.num_layers >= 1


def test_overrides_apply_and_parse_types():
  cfg = load_config('configs/tiny.yaml', ['moe.k_expert=1', 'moe.capacity_factor=2', 'model.tie_embeddings=false',
                                          'moe.dispatch=gather'])
  assert cfg.moe.k_expert == 1 and cfg.moe.capacity_factor == 2.0 and isinstance(cfg.moe.capacity_factor, float)
  assert cfg.model.tie_embeddings is False and cfg.moe.dispatch == 'gather'


def test_quadrillion_is_the_spec_example():
  cfg = load_config('configs/quadrillion.yaml')
  assert cfg.moe.k_active == 4 and cfg.model.num_layers == 128


@pytest.mark.parametrize('overrides, field, words', [
    ({'moe': {'k_expert': 9}}, 'moe.k_expert', 'experts_per_group'),
    ({'moe': {'k_group': 3, 'groups_per_tier': 2}}, 'moe.k_group', 'groups_per_tier'),
    ({'moe': {'k_tier': 2, 'num_tiers': 1}}, 'moe.k_tier', 'num_tiers'),
    ({'moe': {'capacity_factor': 0}}, 'moe.capacity_factor', '> 0'),
    ({'moe': {'capacity_factor': -1.5}}, 'moe.capacity_factor', '> 0'),
    ({'model': {'d_model': 100, 'num_heads': 3}}, 'model.d_model', 'num_heads'),
    ({'model': {'num_heads': 4, 'num_kv_heads': 3}}, 'model.num_heads', 'num_kv_heads'),
    ({'model': {'bogus': 1}}, 'model.bogus', 'unknown key'),
    ({'moes': {'k_expert': 1}}, 'moes', 'unknown section'),
    ({'model': {'d_model': 'big'}}, 'model.d_model', 'integer'),
    ({'model': {'d_model': 64.5}}, 'model.d_model', 'integer'),
    ({'model': {'tie_embeddings': 'yes'}}, 'model.tie_embeddings', 'bool'),
    ({'moe': {'score': 'relu'}}, 'moe.score', 'one of'),
    ({'moe': {'dispatch': 'magic'}}, 'moe.dispatch', 'one of'),
    ({'moe': {'expert_kind': 'moe'}}, 'moe.expert_kind', 'one of'),
    ({'moe': {'bias_update_rate': 0.01, 'score': 'softmax'}}, 'moe.bias_update_rate', 'sigmoid'),
    ({'mesh': {'expert': 0}}, 'mesh.expert', '> 0'),
    ({'mesh': {'data': -1, 'expert': -1}}, 'mesh', 'at most one'),
    ({'train': {'lr': 0}}, 'train.lr', '> 0'),
    ({'model': {'head_dim': 3}}, 'model.head_dim', 'even'),
    ({'model': {'kv_lora_rank': 8}}, 'model.kv_lora_rank', 'model.attention=mla'),
    ({'model': {'attention': 'mla', 'kv_lora_rank': 8, 'qk_nope_head_dim': 4, 'qk_rope_head_dim': 3,
                'v_head_dim': 4}}, 'model.qk_rope_head_dim', 'even'),
    ({'model': {'attention': 'mla', 'qk_nope_head_dim': 4, 'qk_rope_head_dim': 4, 'v_head_dim': 4}},
     'model.kv_lora_rank', '> 0'),
    ({'model': {'attention': 'mla', 'head_dim': 8, 'kv_lora_rank': 8, 'qk_nope_head_dim': 4, 'qk_rope_head_dim': 4,
                'v_head_dim': 4}}, 'model.head_dim', 'unused'),
    ({'model': {'rope_factor': 40}}, 'model.rope_factor', 'rope_scaling=yarn'),
    ({'model': {'rope_scaling': 'yarn', 'rope_factor': 40, 'rope_original_max_len': 64}}, 'model.rope_scaling',
     'attention=mla'),
    ({'model': {'attention': 'mla', 'kv_lora_rank': 8, 'qk_nope_head_dim': 4, 'qk_rope_head_dim': 4, 'v_head_dim': 4,
                'rope_scaling': 'yarn', 'rope_factor': 40}}, 'model.rope_original_max_len', '> 0'),
    ({'model': {'rope_scaling': 'ntk'}}, 'model.rope_scaling', 'one of'),
    ({'moe': {'expert_selection': 'all'}}, 'moe.expert_selection', 'one of'),
    ({'model': {'dense_layers': '0,x'}}, 'model.dense_layers', '0-based layers'),
    ({'model': {'dense_layers': '3-1'}}, 'model.dense_layers', '0-based layers'),
    ({'model': {'dense_layers': '2'}}, 'model.dense_layers', 'does not exist'),
    ({'model': {'dense_layers': '0', 'scan_layers': True}}, 'model.dense_layers', 'scan_layers'),
    ({'model': {'qk_norm': 'yes'}}, 'model.qk_norm', 'bool'),
    ({'moe': {'pregate': -1}}, 'moe.pregate', '>= 0'),
    ({'moe': {'pregate': 2}, 'model': {'num_layers': 2}}, 'moe.pregate', 'less than the MoE layers (2)'),
])
def test_invalid_configs_name_field_and_constraint(overrides, field, words):
  with pytest.raises(ConfigError) as e:
    from_dict(overrides)
  assert field in str(e.value) and words in str(e.value)


def test_bad_set_syntax_and_missing_file(tmp_path):
  with pytest.raises(ConfigError, match='section.key=value'):
    parse_overrides(['moe.k_expert'])
  with pytest.raises(ConfigError, match='section.key'):
    parse_overrides(['k_expert=2'])
  with pytest.raises(ConfigError, match='unknown key'):
    load_config('configs/tiny.yaml', ['moe.k_experts=2'])
  with pytest.raises(ConfigError, match='does not exist'):
    load_config(tmp_path / 'nope.yaml')
  bad = tmp_path / 'bad.yaml'
  bad.write_text('model: [1, 2\n')
  with pytest.raises(ConfigError, match='not valid YAML'):
    load_config(bad)


def test_yaml_is_read_safely(tmp_path):
  evil = tmp_path / 'evil.yaml'
  evil.write_text('model: !!python/object/apply:os.system ["echo hi"]\n')
  with pytest.raises(ConfigError):
    load_config(evil)


def test_dense_layers_name_dense_layers_among_moe_every():
  m = from_dict({'model': {'num_layers': 6, 'moe_every': 2, 'dense_layers': ' 0-1, 5'}}).model
  assert [m.is_moe_layer(i) for i in range(6)] == [False, False, False, True, False, False]
  assert m.num_moe_layers == 1
  assert from_dict({'model': {'num_layers': 3, 'dense_layers': '0-2'}}).model.num_moe_layers == 0


def test_config_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    Config().model.d_model = 3


def test_capacity_formula_and_auto():
  m = from_dict({'moe': {'experts_per_group': 8, 'k_expert': 2, 'capacity_factor': 1.25}}).moe
  assert capacity(m, 64) == 20            # ceil(1.25 * 64 * 2 / 8)
  assert capacity(m, 10) == 4             # ceil(3.125)
  assert resolve_dispatch(m, 64) == 'capacity'
  big = from_dict({'moe': {'num_tiers': 64, 'groups_per_tier': 64, 'experts_per_group': 64, 'k_expert': 2}}).moe
  assert capacity(big, 64) == 1           # E = 262,144 >> 1.25 * 64 * 2: the buffer would be empty
  assert resolve_dispatch(big, 64) == 'gather'
  # E = 1024 vs N·K = 2048: every expert gets ~2 tokens, the buffer (C = 3) beats gathering weights
  mid = from_dict({'moe': {'experts_per_group': 1024, 'k_expert': 2}}).moe
  assert capacity(mid, 1024) == 3 and resolve_dispatch(mid, 1024) == 'capacity'
  assert resolve_dispatch(mid, 256) == 'gather'    # E = 2·N·K: half the experts idle at best
  assert resolve_dispatch(mid, 257) == 'capacity'


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
  assert load_config(overrides=['train.lr=1e-3']).train.lr == 1e-3
  f = tmp_path / 'c.yaml'
  f.write_text('train:\n  lr: 3E-4\n  weight_decay: 1.0e-1\n')
  cfg = load_config(f)
  assert cfg.train.lr == 3e-4 and cfg.train.weight_decay == 0.1
  assert parse_overrides(['model.name=1e3x']) == {'model': {'name': '1e3x'}}   # not a number: still a string


# Shapes small enough to compile in seconds; the structure (levels, K, dispatch kind, scan, dtypes)
# stays the config's own. quadrillion.yaml also loses most of its 983,040 experts per layer.
SHRINK = ['model.d_model=32', 'model.num_layers=2', 'model.seq_len=32', 'model.num_heads=2',
          'model.num_kv_heads=2', 'model.head_dim=0', 'model.d_ff=0', 'moe.d_expert=32', 'moe.d_shared=0',
          'model.vocab_size=256', 'mesh.data=-1', 'mesh.expert=1', 'mesh.tensor=1']
SHRINK_EXPERTS = {'quadrillion': ['moe.num_tiers=2', 'moe.groups_per_tier=4', 'moe.experts_per_group=8'],
                  'deepseek_v3': ['moe.experts_per_group=4', 'model.q_lora_rank=16', 'model.kv_lora_rank=16',
                                  'model.qk_nope_head_dim=8', 'model.qk_rope_head_dim=8', 'model.v_head_dim=8']}


@pytest.mark.parametrize('path', all_config_files(), ids=lambda p: p.name)
def test_shipped_config_model_matches_closed_form_counts(path):
  """The abstract model of every shipped config (full size: shapes only) has bounds' parameter count."""
  from litejax.model import bounds
  from litejax.analysis.footprint import count_model_params
  cfg = load_config(path)
  assert count_model_params(cfg) == bounds.param_counts(cfg).total


@pytest.mark.parametrize('path', all_config_files(), ids=lambda p: p.name)
def test_shipped_config_shrunk_is_within_the_bound(path, capsys):
  """`litejax bound` on every shipped config, shrunk: it compiles and stays within the bound."""
  import json

  from litejax import cli
  shrink = SHRINK + SHRINK_EXPERTS.get(path.stem, [])
  rc = cli.main(['bound', '--config', str(path), '--devices', '1', '--json',
                 *[a for o in shrink for a in ('--set', o)]])
  out = capsys.readouterr()
  assert rc == 0, out.err
  rep = json.loads(out.out)
  assert rep['violations'] == [] and rep['flops_per_token_compiled'] > 0


def test_shipped_configs_are_found_by_name():
  from litejax.config import resolve_config_path, shipped_configs
  assert {p.stem for p in all_config_files()} == set(shipped_configs())
  assert resolve_config_path('tiny') == resolve_config_path('tiny.yaml') == shipped_configs()['tiny']
  assert load_config('tiny') == load_config(CONFIG_DIR / 'tiny.yaml')


def test_store_placement_validated():
  """store.placement (TierSets): one storage class per routing tier, enough hot tiers for k_tier."""
  from litejax.config import ConfigError, from_dict
  moe = {'num_tiers': 4, 'groups_per_tier': 2, 'experts_per_group': 4, 'k_tier': 1}
  cfg = from_dict({'moe': moe, 'store': {'placement': 'hot, warm,cold,cold'}})
  assert cfg.store.classes(4) == ('hot', 'warm', 'cold', 'cold')
  assert from_dict({'moe': moe}).store.classes(4) == ('hot',) * 4
  for placement, msg in (('hot,warm', 'one class per routing tier'), ('hot,warm,tepid,cold', "'tepid'"),
                         ('warm,warm,cold,cold', 'at least moe.k_tier=1 hot tiers')):
    with pytest.raises(ConfigError, match=f'store.placement: .*{msg}'):
      from_dict({'moe': moe, 'store': {'placement': placement}})
  with pytest.raises(ConfigError, match='store.placement: must be a string'):
    from_dict({'moe': moe, 'store': {'placement': 3}})
