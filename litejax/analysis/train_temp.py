"""The sparse train step's temporaries against the touched experts' training state (`litejax bound --train`).

With the sparse expert update a step reads and writes u rows of each expert table, so its temporaries
should be of the order of those rows' training state, not of the tables. One backend artefact is set
apart first: XLA:CPU emulates bf16 and does not scatter it in place, so the row update works on one
table-sized uint16 copy of each bf16 expert table (`hlo_artefacts.table_copies` finds them in the HLO).
On TPU, with the tables scattered as bf16 (litejax.model.moe.row_grad.bits_view off), there is no such copy.

  touched state  per device: MoE layers × rows one device updates (u per (data, expert) rank, summed over
                 the data ranks of its expert rank, at most E_local) × for each expert table's row: its
                 parameters, its f32 gradient and its row optimizer state (`sparse_optim.row_state_bytes`).
  check          temp − artefact ≤ TEMP_FACTOR × touched state: reported (`temp_check`), not a `litejax
                 bound` violation, since the step's activations are not modelled and dominate the
                 temporaries of small configs (tests/test_bound_whole_program.py's shrunk quadrillion).
"""
from __future__ import annotations

import math

from litejax import units

# Temporaries per device beyond the CPU table copy, in units of the touched experts' training state:
# the rows gathered in f32 for the update, their gradients before and after the regroup, the dispatch
# buffers and activations of the step. The shrunk quadrillion (experiments/temp_breakdown.py) and the
# full one stay below it (docs/training.md "Sparse expert updates").
TEMP_FACTOR = 4.0


def expert_tables_per_device(cfg, mesh) -> list[dict]:
  """Every MoE expert table of the train state: its per-device shape and dtype (abstract, nothing allocated)."""
  import jax

  from litejax.analysis import footprint
  from litejax.train import step as train_step
  _, abstract, _ = train_step.state_layout(cfg, mesh)
  out = []
  for path, sds in jax.tree_util.tree_leaves_with_path(abstract['params']):
    if footprint.table_kind(jax.tree_util.keystr(path)) == 'experts':
      shard = sds.sharding.shard_shape(sds.shape)
      out.append({'path': jax.tree_util.keystr(path), 'shape': tuple(shard), 'dtype': str(sds.dtype),
                  'bytes': math.prod(shard) * units.dtype_bytes(str(sds.dtype))})
  return out


def touched_state_bytes(cfg, sizes: dict[str, int], tokens: int, tables: list[dict]) -> float:
  """Training state of the expert rows one device updates in a step (see the module docstring)."""
  from litejax.train import row_optim, sparse_step as sparse_train
  m = cfg.moe
  ranks = sizes['data'] * sizes['expert']
  per_rank = sparse_train.row_bounds(cfg, tokens, sizes)['experts'] // ranks
  rows = min(m.experts_total // sizes['expert'], sizes['data'] * per_rank)
  pbytes = units.dtype_bytes(cfg.model.param_dtype)
  total = 0
  for t in tables:   # [*layers, E_local, d, h]: a scanned table stacks its layers, an unscanned one is one layer
    row = t['shape'][-2:]   # [d, h] or [h, d], as split over the tensor ranks
    per_row = row_optim.row_state_bytes(row, cfg.train.expert_optimizer, pbytes) + 4 * math.prod(row)
    total += math.prod(t['shape'][:-3]) * rows * per_row
  return float(total)


def temp_report(prog, memory: dict) -> dict | None:
  """{'temp_cpu_bf16_table_copy': bytes, 'check': {...}} for a sparse train step; None otherwise."""
  from litejax.hlo import parse as hlo, artefacts as hlo_artefacts
  from litejax import sharding
  from litejax.train import sparse_step as sparse_train
  if not prog.train or not prog.cfg.model.num_moe_layers or sparse_train.update_mode(prog.cfg, prog.mesh) != 'sparse':
    return None
  tables = expert_tables_per_device(prog.cfg, prog.mesh)
  sizes = sharding.mesh_sizes(prog.mesh)
  narrow = [t for t in tables if t['dtype'] in ('bfloat16', 'float16')]
  copied = hlo_artefacts.table_copies(hlo.parse(prog.hlo_text), [math.prod(t['shape']) for t in narrow])
  artefact = float(sum(t['bytes'] for t, c in zip(narrow, copied) if c))
  touched = touched_state_bytes(prog.cfg, sizes, prog.tokens, tables)
  rest = memory.get('temp', 0) - artefact
  return {'temp_cpu_bf16_table_copy': artefact,
          'check': {'temp_minus_artefact': rest, 'touched_expert_state': touched,
                    'ratio': rest / touched if touched else math.inf, 'factor': TEMP_FACTOR,
                    'ok': rest <= TEMP_FACTOR * touched}}
