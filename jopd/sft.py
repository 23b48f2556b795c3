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

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import config_flags

from jopd import buckets, checkpoint, cli, runtime, scoring, update
from jopd import mesh as mesh_lib
from jopd import metrics as metrics_lib
from jopd.data import builders, packing
from jopd.data import pipeline as data_pipeline
from jopd.data.rows import RowError, SkipCounter
from jopd.data.sft import render_sft

log = logging.getLogger("jopd")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)


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


def pack_batch(examples, c, shards: int) -> dict[str, np.ndarray]:
  """Packs one step's conversations first-fit-decreasing into rows of a bucketed length; rows padded to a
  bucketed count. 'loss_weights' fold in the reduction: 'mean' weights each conversation's tokens by
  1 / (its weight sum * conversations), so the summed loss is the mean of per-conversation mean NLLs."""
  lengths = [len(ids) for ids, _ in examples]
  seq_len = buckets.length_bucket(max(lengths))
  order = sorted(range(len(examples)), key=lambda i: -lengths[i])
  bins, unplaced = packing.first_fit(lengths, order, len(examples), seq_len)
  assert not unplaced  # one bin per conversation always suffices
  bins = [b for b in bins if b]
  rows = packing.pack_rows(examples, bins, seq_len)
  num_rows = buckets.batch_bucket(len(bins), shards)
  batch = {k: np.pad(v, ((0, num_rows - len(bins)), (0, 0))) for k, v in rows.items()}
  weights = batch["weights_bt"]
  if c.reduction == "mean":
    seg = batch["segment_ids_bt"]
    loss_weights = np.zeros_like(weights)
    for r in range(num_rows):
      for s in np.unique(seg[r][seg[r] > 0]):
        sel = seg[r] == s
        total = weights[r][sel].sum()
        if total > 0:
          loss_weights[r][sel] = weights[r][sel] / total / len(examples)
  elif c.reduction == "sum":
    loss_weights = weights
  else:
    raise ValueError(f"--config.reduction={c.reduction!r}; expected 'sum' or 'mean'")
  return {"tokens": batch["tokens_bt"], "targets": batch["targets_bt"], "positions": batch["positions_bt"],
          "segment_ids": batch["segment_ids_bt"], "attention_mask": batch["segment_ids_bt"] > 0,
          "weights": weights, "loss_weights": loss_weights.astype(np.float32), "loss_mask": weights > 0}


def byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes each token id stands for (for bits per byte); special tokens count as 0."""
  out = np.zeros(vocab_size, np.float32)
  special = set(tokenizer.all_special_ids)
  for token, i in tokenizer.get_vocab().items():
    if i < vocab_size and i not in special:
      out[i] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
  return out


# ============================================================================================ loss

def sft_loss(model_cfg, lora_enabled, lora_scale, trainable, frozen, mb, totals):
  del totals  # the reduction is folded into mb['loss_weights'] on the host
  params, adapters = update.model_args(trainable, frozen, lora_enabled)
  logp_bt, _ = scoring.sequence_logprobs(
      model_cfg, params, mb["tokens"], mb["attention_mask"], mb["targets"], adapters=adapters,
      lora_scale=lora_scale, positions_bt=mb["positions"], segment_ids_bt=mb["segment_ids"])
  nll_bt = -logp_bt
  loss = jnp.sum(nll_bt * mb["loss_weights"])
  # Sums (named *tokens* so micro-batches add them up); the host divides.
  return loss, {"nll_x_tokens": jnp.sum(nll_bt * mb["weights"]), "tokens": jnp.sum(mb["weights"])}


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _eval_sums(trainable, frozen, batch, *, loss_fn):
  _, m = loss_fn(trainable, frozen, batch, None)
  return m


def evaluate_nll(examples, trainable, frozen, loss_fn, c, mesh, shards: int) -> float:
  nll, tokens = 0.0, 0.0
  for start in range(0, len(examples), c.batch_size):
    batch = pack_batch(examples[start:start + c.batch_size], c, shards)
    m = _eval_sums(trainable, frozen, update.put_batch(batch, mesh), loss_fn=loss_fn)
    nll, tokens = nll + float(m["nll_x_tokens"]), tokens + float(m["tokens"])
  return nll / max(tokens, 1.0)


# ============================================================================================ main loop

def run(c) -> dict[str, float]:
  """Trains per `c`; returns the last step's metrics."""
  cli.check_config(c)
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
  data = data_pipeline.Pipeline(examples, groups_per_batch=min(c.batch_size, len(examples)), seed=c.seed,
                                num_epochs=c.num_epochs or None, name=c.dataset)
  total_steps = c.max_steps or data.batches_per_epoch * max(1, c.num_epochs)
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
  loss_fn = functools.partial(sft_loss, student.cfg, lcfg.enabled, lcfg.scale)
  bytes_per_token = byte_lengths(student.tokenizer, student.cfg.vocab_size)
  last: dict[str, float] = {}

  for step in range(start, total_steps):
    t0 = time.perf_counter()
    try:
      batch = pack_batch(next(data), c, shards)
    except StopIteration:
      break
    micro = max(1, batch["tokens"].shape[0] // c.micro_batch_size) if c.micro_batch_size else 1
    trainable, opt_state, m = update.train_step(state["trainable"], state["opt_state"], frozen,
                                                update.put_batch(batch, mesh), loss_fn=loss_fn,
                                                optimizer=optimizer, num_micro=micro)
    state = dict(state, trainable=trainable, opt_state=opt_state)
    nll_sum, tokens = float(m["nll_x_tokens"]), float(m["tokens"])
    target_bytes = float(np.sum(bytes_per_token[batch["targets"]] * batch["weights"]))
    done = step + 1
    out = {"train/nll": nll_sum / max(tokens, 1.0), "train/num_tokens": int(batch["attention_mask"].sum()),
           "train/num_loss_tokens": tokens, "train/bits_per_byte": nll_sum / math.log(2) / max(target_bytes, 1.0),
           "train/loss": float(m["loss"]), "train/grad_norm": float(m["grad_norm"]),
           "train/skipped_nonfinite": float(m["skipped_nonfinite"]),
           "data/padding_frac": packing.padding_frac({"segment_ids_bt": batch["segment_ids"]}),
           "time/step": time.perf_counter() - t0, **counter.metrics()}
    if eval_examples and c.eval_every and (done % c.eval_every == 0 or done == total_steps):
      out["eval/nll"] = evaluate_nll(eval_examples, state["trainable"], frozen, loss_fn, c, mesh, shards)
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
