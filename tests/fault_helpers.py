"""Damage a file the three ways the fault tests try: a flipped byte, a truncation, or the file gone."""
import pathlib

DAMAGES = ('flip', 'truncate', 'missing')


def damage(path: pathlib.Path, how: str) -> None:
  """flip: one bit of the middle byte; truncate: the second half cut off; missing: the file deleted."""
  if how == 'missing':
    path.unlink()
    return
  data = bytearray(path.read_bytes())
  if how == 'flip':
    data[len(data) // 2] ^= 0x10
  elif how == 'truncate':
    del data[len(data) // 2:]
  else:
    raise ValueError(f'damage: one of {DAMAGES}, got {how!r}')
  path.write_bytes(bytes(data))
