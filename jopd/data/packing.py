"""Sequence packing: (token_ids, weights) examples -> fixed [B, T] rows holding several conversations, with
segment ids, positions restarting per segment and next-token targets that never cross a segment boundary.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("tokens_bt", "targets_bt", "weights_bt", "segment_ids_bt", "positions_bt")


def padding_frac(batch: Batch) -> float:
  """Padding tokens / all tokens of the batch (the `data/padding_frac` metric); segment id 0 is padding."""
  segment_ids_bt = np.asarray(batch["segment_ids_bt"])
  return float(np.mean(segment_ids_bt == 0)) if segment_ids_bt.size else 0.0


def attention_mask(batch: Batch) -> np.ndarray:
  """bool [B, T]: real (non-padding) tokens, the `attention_mask_bt` that goes with `segment_ids_bt`."""
  return np.asarray(batch["segment_ids_bt"]) > 0


def first_fit(lengths: Sequence[int], order: Sequence[int], num_bins: int, capacity: int
              ) -> tuple[list[list[int]], list[int]]:
  """Places items into `num_bins` bins of `capacity` tokens, visiting items in `order` and putting each into
  the first bin with room. Returns (bins: item indices per bin in placement order, unplaced item indices)."""
  free_b = np.full(num_bins, capacity, np.int64)
  bins: list[list[int]] = [[] for _ in range(num_bins)]
  unplaced: list[int] = []
  smallest = min(lengths) if len(lengths) else 0
  for k, i in enumerate(order):
    fits = np.flatnonzero(free_b >= lengths[i])
    if fits.size:
      free_b[fits[0]] -= lengths[i]
      bins[fits[0]].append(i)
    else:
      unplaced.append(i)
    if free_b.max() < smallest:  # every bin is fuller than the smallest item: nothing else can be placed
      unplaced.extend(order[k + 1:])
      break
  return bins, unplaced


def pack_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]] | Mapping[int, tuple[np.ndarray, np.ndarray]],
              bins: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0) -> Batch:
  """Lays out `bins` (lists of keys of `examples`, one list per row) as a [len(bins), seq_len] batch.

  The shift: an example's `weights[i]` is the loss weight of token i *as a target* (what `render_sft` returns),
  and the loss at position p predicts the token at p + 1. Where position p holds token i of a segment,
  `targets_bt[r, p] = tokens[i + 1]` and `weights_bt[r, p] = weights[i + 1]`. A segment's last position has
  target `pad_id` and weight 0, so no position learns to predict the next conversation's first token (and
  `weights[0]`, a token with no predecessor, is never used). Padding: segment id 0, weight 0, position 0.
  """
  num_rows = len(bins)
  tokens_bt = np.full((num_rows, seq_len), pad_id, np.int32)
  targets_bt = np.full((num_rows, seq_len), pad_id, np.int32)
  weights_bt = np.zeros((num_rows, seq_len), np.float32)
  segment_ids_bt = np.zeros((num_rows, seq_len), np.int32)
  positions_bt = np.zeros((num_rows, seq_len), np.int32)
  for r, row in enumerate(bins):
    start = 0
    for segment, i in enumerate(row, start=1):
      tokens, weights = examples[i]
      n = len(tokens)
      if start + n > seq_len:
        raise ValueError(f"packing.pack_rows: row {r} holds {start + n} tokens > seq_len={seq_len}; "
                         "each bin must sum to at most seq_len")
      end = start + n
      tokens_bt[r, start:end] = tokens
      targets_bt[r, start:end - 1] = tokens[1:]
      weights_bt[r, start:end - 1] = weights[1:]
      segment_ids_bt[r, start:end] = segment
      positions_bt[r, start:end] = np.arange(n)
      start = end
  return {"tokens_bt": tokens_bt, "targets_bt": targets_bt, "weights_bt": weights_bt,
          "segment_ids_bt": segment_ids_bt, "positions_bt": positions_bt}


class StreamPacker:
  """Streaming first-fit-decreasing packer over example keys, with a bounded buffer.

  `add(key, length)` buffers an example (the caller keeps its tokens; a key is e.g. its index in a list); once
  the buffer holds `buffer_batches` batches' worth of tokens, `pop` returns one batch as `batch_size` bins (the
  keys of each row, in layout order; a bin may be empty): buffered examples are placed longest first, and
  whatever does not fit stays for the next batch. An example passed over `max_wait` times is placed before all
  others (in arrival order) so that no length starves. Output depends only on the order of `add` calls; the
  state is a small JSON dict of keys, lengths and ages (no tokens), checkpointable with the data iterator.
  """

  def __init__(self, batch_size: int, seq_len: int, *, buffer_batches: float = 2.0, max_wait: int = 4):
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"StreamPacker: batch_size={batch_size}, seq_len={seq_len}; expected batch_size >= 1 "
                       "and seq_len >= 2")
    if buffer_batches < 1.0:
      raise ValueError(f"StreamPacker: buffer_batches={buffer_batches}; expected >= 1.0 (a batch's worth of "
                       "tokens must be buffered before packing it)")
    self.batch_size, self.seq_len = batch_size, seq_len
    self.buffer_batches, self.max_wait = buffer_batches, max_wait
    self._keys: list[int] = []
    self._lengths: list[int] = []
    self._ages: list[int] = []
    self._arrivals: list[int] = []
    self._next_arrival = 0
    self._buffered_tokens = 0

  def add(self, key: int, length: int) -> None:
    if not 1 <= length <= self.seq_len:
      raise ValueError(f"StreamPacker.add (example {key}, arrival #{self._next_arrival}): length {length}; "
                       f"expected 1..seq_len={self.seq_len} (render with max_length <= {self.seq_len})")
    self._keys.append(int(key))
    self._lengths.append(int(length))
    self._ages.append(0)
    self._arrivals.append(self._next_arrival)
    self._next_arrival += 1
    self._buffered_tokens += int(length)

  def __len__(self) -> int:
    return len(self._keys)

  def ready(self) -> bool:
    """True once enough tokens are buffered that a packed batch is unlikely to be short of fillers."""
    return self._buffered_tokens >= self.buffer_batches * self.batch_size * self.seq_len

  def pop(self) -> list[list[int]]:
    """Bins of one batch from the buffer (rows may be partly or wholly empty when the buffer is short)."""
    overdue = [i for i, age in enumerate(self._ages) if age >= self.max_wait]
    rest = sorted((i for i, age in enumerate(self._ages) if age < self.max_wait), key=lambda i: -self._lengths[i])
    bins, unplaced = first_fit(self._lengths, overdue + rest, self.batch_size, self.seq_len)
    out = [[self._keys[i] for i in row] for row in bins]
    keep = sorted(unplaced)  # back to arrival order, so the next pop sees the same order on a restored packer
    self._keys = [self._keys[i] for i in keep]
    self._lengths = [self._lengths[i] for i in keep]
    self._ages = [self._ages[i] + 1 for i in keep]
    self._arrivals = [self._arrivals[i] for i in keep]
    self._buffered_tokens = sum(self._lengths)
    return out

  def get_state(self) -> dict[str, Any]:
    return {"keys": list(self._keys), "lengths": list(self._lengths), "ages": list(self._ages),
            "arrivals": list(self._arrivals), "next_arrival": self._next_arrival}

  def set_state(self, state: dict[str, Any]) -> None:
    fields = ("keys", "lengths", "ages", "arrivals")
    if len({len(state[f]) for f in fields}) != 1:
      raise ValueError(f"StreamPacker.set_state: {', '.join(fields)} must be lists of equal length, got "
                       f"{[len(state[f]) for f in fields]}")
    self._keys, self._lengths, self._ages, self._arrivals = ([int(x) for x in state[f]] for f in fields)
    self._next_arrival = int(state["next_arrival"])
    self._buffered_tokens = sum(self._lengths)


def pack_stream(examples: Iterable[tuple[Any, Any]], batch_size: int, seq_len: int, *,
                buffer_batches: float = 2.0, max_wait: int = 4, pad_id: int = 0,
                drop_remainder: bool = False) -> Iterator[Batch]:
  """Packs an iterable of (token_ids, weights) into [batch_size, seq_len] batches (a StreamPacker keyed by
  arrival). At the end the buffer is flushed into final batches, which are mostly padding; `drop_remainder`
  drops those instead."""
  packer = StreamPacker(batch_size, seq_len, buffer_batches=buffer_batches, max_wait=max_wait)
  waiting: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def pop() -> Batch:
    bins = packer.pop()
    batch = pack_rows(waiting, bins, seq_len, pad_id)
    for key in (k for row in bins for k in row):
      del waiting[key]
    return batch

  for key, (token_ids, weights) in enumerate(examples):
    tokens, weights = np.asarray(token_ids, np.int32), np.asarray(weights, np.float32)
    if tokens.ndim != 1 or tokens.shape != weights.shape:
      raise ValueError(f"pack_stream (example #{key}): token_ids {tokens.shape} and weights {weights.shape} "
                       "must be 1-D and of equal length")
    packer.add(key, len(tokens))
    waiting[key] = (tokens, weights)
    while packer.ready():
      yield pop()
  while len(packer) and not drop_remainder:
    yield pop()


def pad_rows(examples: Sequence[tuple[Any, Any]], seq_len: int, pad_id: int = 0) -> Batch:
  """One example per row, right-padded: the unpacked baseline (same layout and shift as packed rows)."""
  return pack_rows([(np.asarray(t), np.asarray(w)) for t, w in examples], [[i] for i in range(len(examples))],
                   seq_len, pad_id)
