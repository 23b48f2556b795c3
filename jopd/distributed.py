"""Host-side collectives of a multi-process run: gather each process's rows and JSON values, fetch global results
to every host, so that all processes run the same SPMD programs on the same global inputs. Every function here
is a collective (all processes call it, in the same order); with one process they cost nothing.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jopd import buckets


def fetch(tree):
  """Global jax arrays (and anything np.asarray takes) -> host numpy arrays with the full global value."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(one, tree)


def replicated(x, mesh):
  """A host value that is the same on every process -> a global array replicated over `mesh`. Unlike
  device_put, this neither needs a cross-process equality check nor lets a committed local array through."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda index: x[index])


def _allgather(x: np.ndarray) -> np.ndarray:
  """[...] on each process -> [process_count, ...], identical on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def allgather_rows(token_fields: Sequence[Sequence[Sequence[int]]], ints: np.ndarray):
  """Every process's rows: `token_fields` is k lists of n token-id rows each, `ints` [n, m] int32 side columns
  (n, k, m the same on every process). Returns (tokens[p][f][i] int32 arrays, ints [P, n, m]).

  Two collectives: lengths and ints first, so that every process pads the tokens to the same width (a bucket
  of the global maximum, so a run compiles few gather programs), then the padded tokens."""
  k, n = len(token_fields), len(ints)
  lengths = np.array([[len(row) for row in field] for field in token_fields], np.int32).reshape(k, n)
  header = _allgather(np.concatenate([lengths.T, np.asarray(ints, np.int32).reshape(n, -1)], axis=1))
  all_lengths = header[:, :, :k]                                            # [P, n, k]
  width = buckets.length_bucket(int(all_lengths.max(initial=0)))
  padded = np.zeros((k, n, width), np.int32)
  for f, field in enumerate(token_fields):
    for i, row in enumerate(field):
      padded[f, i, :len(row)] = row
  everything = _allgather(padded)                                           # [P, k, n, width]
  tokens = [[[everything[p, f, i, :all_lengths[p, i, f]] for i in range(n)] for f in range(k)]
            for p in range(len(everything))]
  return tokens, header[:, :, k:]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any one (e.g. a SIGTERM that reached only some hosts)."""
  return bool(_allgather(np.array([flag], np.int32)).any())


def allgather_json(value: Any) -> list[Any]:
  """A JSON value from every process, as a list indexed by process (e.g. each one's data iterator state)."""
  data = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), np.uint8)
  sizes = _allgather(np.array([data.size], np.int32))[:, 0]
  padded = np.zeros((buckets.length_bucket(int(sizes.max())),), np.uint8)
  padded[:data.size] = data
  everything = _allgather(padded)
  return [json.loads(everything[p, :sizes[p]].tobytes().decode("utf-8")) for p in range(len(everything))]


def check_same(value: Any, what: str) -> None:
  """Raises on every process when `value` (JSON) differs between processes, naming `what` and the values: hosts
  that read different data or configs would otherwise train on overlapping or misaligned shards."""
  values = allgather_json(value)
  if any(v != values[0] for v in values):
    detail = ", ".join(f"process {p}: {v!r}" for p, v in enumerate(values))
    raise ValueError(f"{what} differs between processes ({detail}); every process must see the same data files "
                     "and config")
