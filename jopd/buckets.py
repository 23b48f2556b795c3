"""Shape buckets: round batch sizes and sequence lengths up to a small fixed ladder so that a run compiles a
handful of programs once, and pad ragged token lists into the fixed-shape arrays those programs take.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Lengths round up to 2^k or 1.5 * 2^k: at most 50% padding, two programs per octave.
MIN_LENGTH = 16


def length_bucket(n: int, minimum: int = MIN_LENGTH) -> int:
  """Smallest value of the ladder 16, 24, 32, 48, 64, 96, ... that holds `n`."""
  if n < 0:
    raise ValueError(f"length_bucket: length {n} is negative")
  size = max(minimum, 1)
  while size < n:
    half = size // 2
    # 2^k -> 1.5 * 2^k -> 2^(k+1); sizes that are not powers of two step to the next power.
    size = size + half if size & (size - 1) == 0 and half >= 8 else 1 << size.bit_length()
  return size


def batch_bucket(n: int, multiple: int = 1) -> int:
  """Next power of two >= n, rounded up to a multiple of `multiple` (the number of batch shards)."""
  if n < 1:
    raise ValueError(f"batch_bucket: batch of {n} rows; expected at least 1")
  size = 1 << (n - 1).bit_length()
  return -(-size // multiple) * multiple


def pad_rows(rows: Sequence[Sequence[int]], batch: int, length: int, *, left: bool,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens [batch, length] int32, mask [batch, length] bool); extra rows are all padding."""
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), bool)
  for i, row in enumerate(rows):
    n = len(row)
    if n > length:
      raise ValueError(f"pad_rows: row {i} has {n} tokens, more than the bucket length {length}")
    span = slice(length - n, length) if left else slice(0, n)
    tokens[i, span] = np.asarray(row, np.int32)
    mask[i, span] = True
  return tokens, mask


def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
  """Raises naming the row and position of the first id outside [0, vocab_size)."""
  for i, row in enumerate(rows):
    ids = np.asarray(row)
    if ids.ndim != 1:
      raise ValueError(f"{what}[{i}]: expected a flat list of token ids, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{what}[{i}]: expected integer token ids, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
      j = int(bad[0])
      raise ValueError(f"{what}[{i}][{j}] = {int(ids[j])} is outside the vocabulary [0, {vocab_size})")
