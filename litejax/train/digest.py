"""Every file's size and SHA-256 in a committed checkpoint folder, and the first file that no longer matches.

`DIR/<step>/litejax_digest.json` = {'algorithm': 'sha256', 'files': {relative path: [size, hex digest]}}, written
atomically (a temporary file renamed) once Orbax has committed the step. litejax.train.checkpoint checks it
before reading a tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import NamedTuple

DIGEST_FILE = 'litejax_digest.json'
_HASH_BLOCK = 1 << 22


class Damage(NamedTuple):
  """What is wrong with a checkpoint folder. kind (a word for the folder it is moved aside to):
  'file-missing', 'truncated', 'sha256-differs' or 'digest-unreadable'."""
  kind: str
  message: str


def sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open('rb') as f:
    while block := f.read(_HASH_BLOCK):
      h.update(block)
  return h.hexdigest()


def write(step_dir: pathlib.Path) -> None:
  """Records size and SHA-256 of every file under a committed step folder."""
  files = {}
  for f in sorted(p for p in step_dir.rglob('*') if p.is_file() and p.name != DIGEST_FILE):
    files[str(f.relative_to(step_dir))] = [f.stat().st_size, sha256(f)]
  tmp = step_dir / (DIGEST_FILE + '.tmp')
  tmp.write_text(json.dumps({'algorithm': 'sha256', 'files': files}))
  os.replace(tmp, step_dir / DIGEST_FILE)


def exists(step_dir: pathlib.Path) -> bool:
  return (step_dir / DIGEST_FILE).is_file()


def first_damage(step_dir: pathlib.Path, prefix: str = '') -> Damage | None:
  """The first file under `prefix` (default: every file) that is missing, resized or changed since the
  digest was written, or an unreadable digest; None when all match. The digest must exist (`exists`)."""
  path = step_dir / DIGEST_FILE
  try:
    recorded = json.loads(path.read_text())['files']
    items = sorted(recorded.items())
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return Damage('digest-unreadable', f'{path}: unreadable digest ({e})')
  for rel, (size, sha) in items:
    if not rel.startswith(prefix):
      continue
    f = step_dir / rel
    if not f.is_file():
      return Damage('file-missing', f'{f}: file missing')
    if f.stat().st_size != size:
      return Damage('truncated', f'{f}: {f.stat().st_size} bytes, {size} when written (truncated?)')
    if sha256(f) != sha:
      return Damage('sha256-differs', f'{f}: SHA-256 differs from when it was written (corrupted)')
  return None
