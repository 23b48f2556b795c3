"""Off-policy SFT on teacher-written conversations: `python -m jopd.sft --config=configs/openthoughts3_sft.py`.

Shares the trainer's mesh, model loading, LoRA, update step, checkpointing and metrics; only the loss and the
packed batches are its own. Its checkpoints start `jopd.train` through `load_checkpoint_path`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import app

from jopd import buckets, checkpoint, cli, losses, runtime, scoring, update
from jopd import mesh as mesh_lib
from jopd import metrics as metrics_lib
from jopd.data import builders, packing
from jopd.data import pipeline as data_pipeline
from jopd.data.rows import RowError, SkipCounter
from jopd.data.sft import render_sft
from models import qwen3

log = logging.getLogger("jopd")

_CONFIG = cli.CONFIG_FLAG


# ============================================================================================ data

def load_conversations(c, dataset: str, tokenizer, counter: SkipCounter, max_rows: int | None):
  """(token ids, loss weights) per valid conversation; bad rows counted by reason (or raised when strict)."""
  examples = []
  for record in builders.read_records(dataset, (c.data_files or None) if dataset == c.dataset else None,
                                      split=c.split, max_rows=max_rows):
    try:
      if record.error is not None:
        raise record.error
      row = record.row
      if not isinstance(row, dict) or "messages" not in row:
        raise RowError("missing_messages", "messages", "row has no 'messages' list")
      ids, weights = render_sft(tokenizer, row["messages"], max_length=c.max_length, train_on=c.train_on)
    except RowError as e:
      counter.skip(e, record.where)
      continue
    examples.append((ids, weights))
  log.info("%s: %d conversations, %d skipped %s", dataset, len(examples), counter.total, dict(counter.counts))
  if not examples:
    raise ValueError(f"--config.dataset={dataset}: no usable conversation (skipped: {dict(counter.counts)})")
  return examples


_MIN_PER_ROW = 4


def batch_shape(lengths: Sequence[int], batch_size: int, shards: int) -> tuple[int, int]:
  """(rows, seq_len) of every batch of the run, so that one train-step program is compiled: rows hold the
  longest example and at least 4 examples of mean length (bucketed; rows that fit only one or two conversations
  pack badly: 18-34% padding measured on the demo's 96-token conversations), and rows are the fewest multiple
  of the batch shards with rows * seq_len >= batch_size * mean length, so that a step holds `batch_size`
  conversations on average (more when one row per shard already holds more)."""
  seq_len = buckets.length_bucket(max(max(lengths), math.ceil(_MIN_PER_ROW * float(np.mean(lengths)))))
  return math.ceil(batch_size * float(np.mean(lengths)) / seq_len / shards) * shards, seq_len


def layout(examples, bins: Sequence[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
  """Packed rows (`bins`: indices into `examples`, one list per row) -> the arrays of sft_loss and train_step.

  'num_examples' is the divisor of reduction='mean' (conversations with a weighted token in the whole batch),
  repeated on every row so that each micro-batch of the batch divides by the same count."""
  rows = packing.pack_rows(examples, bins, seq_len)
  weights, segment_ids = rows["weights_bt"], rows["segment_ids_bt"]
  conversation_ids = np.arange(len(bins))[:, None] * (seq_len + 1) + segment_ids
  num_examples = len(np.unique(conversation_ids[weights > 0]))
  return {"tokens": rows["tokens_bt"], "targets": rows["targets_bt"], "positions": rows["positions_bt"],
          "segment_ids": segment_ids, "attention_mask": segment_ids > 0, "weights": weights,
          "loss_mask": weights > 0, "num_examples": np.full(len(bins), num_examples, np.float32)}


class PackedBatches:
  """Batches of one fixed [rows, seq_len] shape, packed from a stream of example indices.

  `indices` yields lists of indices into `examples` (a data_pipeline.Pipeline: seeded order, resumable); they
  go through a packing.StreamPacker, so a conversation that does not fit waits in a bounded buffer for a later
  batch (its max_wait keeps long ones from starving). When `indices` ends, the buffer is flushed: every index
  the stream yields is packed exactly once. The state (iterator position plus the buffered indices, lengths
  and ages; no tokens) is JSON and resumes the exact batch sequence.
  """

  def __init__(self, examples, indices: Iterator[list[int]], rows: int, seq_len: int, *,
               buffer_batches: float = 2.0, max_wait: int = 4):
    self.examples, self.rows, self.seq_len = examples, rows, seq_len
    self._indices = indices
    self._packer = packing.StreamPacker(rows, seq_len, buffer_batches=buffer_batches, max_wait=max_wait)
    self._exhausted = False

  def __iter__(self):
    return self

  def next_bins(self) -> list[list[int]]:
    """The next batch as `rows` lists of example indices (StopIteration once the stream and buffer are empty)."""
    while not self._packer.ready() and not self._exhausted:
      try:
        chunk = next(self._indices)
      except StopIteration:
        self._exhausted = True
        break
      for i in chunk:
        self._packer.add(int(i), len(self.examples[int(i)][0]))
    if not len(self._packer):
      raise StopIteration
    return self._packer.pop()

  def __next__(self) -> dict[str, np.ndarray]:
    return layout(self.examples, self.next_bins(), self.seq_len)

  def get_state(self) -> dict:
    return {"rows": self.rows, "seq_len": self.seq_len, "indices": self._indices.get_state(),
            "packer": self._packer.get_state()}

  def set_state(self, state: dict) -> None:
    if "packer" not in state:
      raise ValueError("SFT data state has no packer buffer (saved before SFT batches were stream-packed); "
                       "start a new log_path with --config.load_checkpoint_path to keep the weights only")
    if (state["rows"], state["seq_len"]) != (self.rows, self.seq_len):
      raise ValueError(f"SFT data state was saved with batches of rows={state['rows']}, "
                       f"seq_len={state['seq_len']} but this run packs rows={self.rows}, seq_len={self.seq_len}; "
                       "resume with the same dataset, max_length, batch_size and mesh")
    for i, n in zip(state["packer"]["keys"], state["packer"]["lengths"]):
      if not 0 <= i < len(self.examples) or len(self.examples[i][0]) != n:
        raise ValueError(f"SFT data state buffers example {i} of length {n}, which this run's dataset "
                         f"({len(self.examples)} conversations) does not have; resume with the same data")
    self._indices.set_state(state["indices"])
    self._packer.set_state(state["packer"])
    self._exhausted = False


def training_batches(examples, c, shards: int) -> tuple[PackedBatches, int]:
  """The run's batches, in a seeded order over `c.num_epochs` epochs (0: forever), and its step count:
  `c.max_steps`, else the batches of max(1, num_epochs) epochs, counted by a dry run over indices and lengths."""
  lengths = [len(ids) for ids, _ in examples]
  rows, seq_len = batch_shape(lengths, c.batch_size, shards)

  def indices(num_epochs):
    # One index per element, so that no epoch leaves a partial batch of conversations out.
    return data_pipeline.Pipeline(list(range(len(examples))), groups_per_batch=1, seed=c.seed,
                                  num_epochs=num_epochs, name=c.dataset)

  total_steps = c.max_steps
  if not total_steps:
    dry_run = PackedBatches(examples, indices(max(1, c.num_epochs)), rows, seq_len)
    while True:
      try:
        dry_run.next_bins()
      except StopIteration:
        break
      total_steps += 1
  log.info("SFT batches: %d rows x %d tokens, %.1f conversations per step on average (batch_size=%d); %d steps",
           rows, seq_len, rows * seq_len / float(np.mean(lengths)), c.batch_size, total_steps)
  return PackedBatches(examples, indices(c.num_epochs or None), rows, seq_len), total_steps


def byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes each token id stands for (for bits per byte); special tokens count as 0."""
  out = np.zeros(vocab_size, np.float32)
  special = set(tokenizer.all_special_ids)
  for token, i in tokenizer.get_vocab().items():
    if i < vocab_size and i not in special:
      out[i] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
  return out


# ============================================================================================ loss

def sft_loss(model_cfg, lora_enabled, lora_scale, reduction, trainable, frozen, mb, totals):
  del totals  # the divisor of reduction='mean' rides in mb['num_examples'] (the whole batch's count)
  params, adapters = update.model_args(trainable, frozen, lora_enabled)
  logp_bt, _ = scoring.sequence_logprobs(
      model_cfg, params, mb["tokens"], mb["attention_mask"], mb["targets"], adapters=adapters,
      lora_scale=lora_scale, positions_bt=mb["positions"], segment_ids_bt=mb["segment_ids"],
      attention_blocks=qwen3.TRAIN_BLOCKS)
  loss, m = losses.cross_entropy_loss(logp_bt, mb["weights"], reduction, num_examples=mb["num_examples"][0],
                                      segment_ids_bt=mb["segment_ids"])
  # Sums (named *tokens* so micro-batches add them up); the host divides.
  return loss, {"nll_x_tokens": m["nll_x_tokens"], "tokens": m["tokens"]}


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _eval_sums(trainable, frozen, batch, *, loss_fn):
  _, m = loss_fn(trainable, frozen, batch, None)
  return m


def evaluate_nll(examples, trainable, frozen, loss_fn, mesh, rows: int) -> float:
  """Token-weighted NLL of every example once, packed like training batches (in dataset order)."""
  seq_len = buckets.length_bucket(max(len(ids) for ids, _ in examples))
  nll, tokens = 0.0, 0.0
  for batch in PackedBatches(examples, iter([[i] for i in range(len(examples))]), rows, seq_len):
    m = _eval_sums(trainable, frozen, update.put_batch(batch, mesh), loss_fn=loss_fn)
    nll, tokens = nll + float(m["nll_x_tokens"]), tokens + float(m["tokens"])
  return nll / max(tokens, 1.0)


# ============================================================================================ main loop

def run(c) -> dict[str, float]:
  """Trains per `c`; returns the last step's metrics."""
  cli.check_config(c)
  if c.reduction not in ("sum", "mean"):
    raise ValueError(f"--config.reduction={c.reduction!r}; expected 'sum' or 'mean'")
  mesh_lib.initialize()
  log_path = runtime.setup_run(c, "sft")
  mesh = mesh_lib.make_mesh(c.mesh_data, c.mesh_fsdp, c.mesh_tensor)
  shards = scoring.batch_sharding(mesh)[1]
  init_key, key = jax.random.split(jax.random.key(c.seed))

  student = runtime.load_model(c.model_name, c, mesh, tokenizer_path=c.tokenizer_path)
  counter = SkipCounter(strict=c.strict)
  examples = load_conversations(c, c.dataset, student.tokenizer, counter, c.max_rows or None)
  eval_examples = (load_conversations(c, c.eval_dataset, student.tokenizer, SkipCounter(strict=c.strict),
                                      c.eval_rows or None) if c.eval_dataset else [])
  data, total_steps = training_batches(examples, c, shards)
  rows = data.rows
  lcfg = runtime.lora_config(c)
  trainable, frozen = runtime.init_trainable(c, student, mesh, init_key)
  optimizer = update.make_optimizer(c, total_steps)
  state = {"trainable": trainable, "opt_state": runtime.init_opt_state(optimizer, trainable, mesh),
           "rng": jax.random.key_data(key)}
  ckpt = checkpoint.Checkpointer(os.path.join(log_path, "checkpoints"), max_to_keep=c.max_to_keep)
  state, start = runtime.restore_or_start(ckpt, state, data.set_state)
  meta = runtime.run_meta(c, student)
  primary = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(log_path, wandb_project=c.wandb_project or None, config=c.to_dict(),
                                     is_primary=primary, start_step=start + 1)
  bar = metrics_lib.ProgressBar(total_steps, initial=start, enabled=primary, desc="sft")
  loss_fn = functools.partial(sft_loss, student.cfg, lcfg.enabled, lcfg.scale, c.reduction)
  bytes_per_token = byte_lengths(student.tokenizer, student.cfg.vocab_size)
  last: dict[str, float] = {}

  for step in range(start, total_steps):
    t0 = time.perf_counter()
    try:
      batch = next(data)
    except StopIteration:
      break
    micro = update.num_micro_batches(batch["tokens"].shape[0], int(c.micro_batch_size))
    trainable, opt_state, m = update.train_step(state["trainable"], state["opt_state"], frozen,
                                                update.put_batch(batch, mesh), loss_fn=loss_fn,
                                                optimizer=optimizer, num_micro=micro)
    state = dict(state, trainable=trainable, opt_state=opt_state)
    nll_sum, tokens = float(m["nll_x_tokens"]), float(m["tokens"])
    target_bytes = float(np.sum(bytes_per_token[batch["targets"]] * batch["weights"]))
    done = step + 1
    out = {"train/nll": nll_sum / max(tokens, 1.0), "train/num_tokens": int(batch["attention_mask"].sum()),
           "train/num_loss_tokens": tokens, "train/num_conversations": int(batch["segment_ids"].max(axis=1).sum()),
           "train/bits_per_byte": nll_sum / math.log(2) / max(target_bytes, 1.0),
           "train/loss": float(m["loss"]), "train/grad_norm": float(m["grad_norm"]),
           "train/skipped_nonfinite": float(m["skipped_nonfinite"]),
           "data/padding_frac": packing.padding_frac({"segment_ids_bt": batch["segment_ids"]}),
           "time/step": time.perf_counter() - t0, **counter.metrics()}
    if eval_examples and c.eval_every and (done % c.eval_every == 0 or done == total_steps):
      out["eval/nll"] = evaluate_nll(eval_examples, state["trainable"], frozen, loss_fn, mesh, rows)
    writer.write(done, out)
    bar.update(done, out)
    last = out
    if (c.save_every and done % c.save_every == 0) or done == total_steps:
      writer.flush()
      ckpt.save(done, state, data_state=data.get_state(), meta=meta, force=True)
    if os.environ.get("JOPD_TEST_KILL_AFTER_STEP") == str(done):  # test hook: see jopd/train.py
      ckpt.wait()
      os.kill(os.getpid(), 9)
  ckpt.wait()
  writer.close()
  bar.close()
  return last


def main(argv):
  del argv
  runtime.setup_logging()
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  run(_CONFIG.value)


if __name__ == "__main__":
  cli.run(main)
