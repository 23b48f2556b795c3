"""The jitted update shared by OPD and SFT: loss -> (micro-batched) gradients -> optax update, guarded so a
non-finite loss or gradient norm leaves params and optimizer state bit-identical.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

F32 = jnp.float32

# loss_fn(trainable, frozen, micro_batch, totals) -> (loss, metrics); `totals` holds whole-batch counts
# ('tokens', 'examples') so micro-batch losses can be normalised as the unsplit batch would be.
LossFn = Callable[[Any, Any, dict, dict], tuple[jax.Array, dict]]


def make_optimizer(c, total_steps: int) -> optax.GradientTransformation:
  """Adam(b1, b2, eps) with a constant / linear / cosine schedule after `warmup_steps`, optional clipping."""
  lr, warmup = float(c.learning_rate), int(c.warmup_steps)
  decay_steps = max(1, int(total_steps) - warmup)
  if c.lr_schedule == "constant":
    after = optax.constant_schedule(lr)
  elif c.lr_schedule == "linear":
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  elif c.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    raise ValueError(f"--config.lr_schedule={c.lr_schedule!r}; expected 'constant', 'linear' or 'cosine'")
  schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup]) if warmup else after
  parts = [optax.clip_by_global_norm(float(c.max_grad_norm))] if c.max_grad_norm else []
  parts.append(optax.adam(schedule, b1=float(c.adam_b1), b2=float(c.adam_b2), eps=float(c.adam_eps)))
  return optax.chain(*parts)


def num_micro_batches(rows: int, micro_batch_size: int) -> int:
  """The fewest micro-batches of at most `micro_batch_size` rows (0: no limit) that split `rows` evenly."""
  if micro_batch_size <= 0 or rows <= micro_batch_size:
    return 1
  return next(n for n in range(-(-rows // micro_batch_size), rows + 1) if rows % n == 0)


def _split_micro(batch: dict, num_micro: int) -> dict:
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_micro} micro-batches")
    return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
  return jax.tree.map(split, batch)


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "num_micro"),
                   donate_argnames=("trainable", "opt_state"))
def train_step(trainable, opt_state, frozen, batch: dict, apply=None, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, num_micro: int = 1):
  """One optimizer update over `batch` (arrays with a leading row axis; 'loss_mask' [B, T] counts tokens).

  Returns (trainable, opt_state, metrics). Metrics: the loss_fn's (per-token means, so micro-batches are
  averaged weighted by their 'loss_mask' token counts; counts named '*tokens*' are summed), `loss`, `grad_norm`,
  `skipped_nonfinite` (1.0 when the update was not applied because the loss or gradient norm was not finite).

  `apply` (a bool scalar array, or None for always): False runs the same program but returns trainable and
  opt_state bit-identical, as for a non-finite loss; a run's warm-up uses it to compile each bucket's update."""
  totals = {"tokens": jnp.sum(batch["loss_mask"].astype(F32)),
            "examples": jnp.sum(jnp.any(batch["loss_mask"], axis=-1)).astype(F32)}
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss, metrics), grads = grad_fn(trainable, frozen, batch, totals)
  else:
    # Losses and gradients add up; per-token metrics (means over each micro-batch's tokens) are averaged
    # weighted by those token counts, so they equal the whole batch's whatever the split (a micro-batch of
    # padding rows weighs nothing).
    def weighted(mb, l, m, g):
      w = jnp.sum(mb["loss_mask"].astype(F32))
      return l, {k: v if "tokens" in k else w * v for k, v in m.items()}, g

    micro = _split_micro(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro)
    (loss, metrics), grads = grad_fn(trainable, frozen, first, totals)
    carry = weighted(first, loss, metrics, grads)

    def accumulate(carry, mb):
      (l, m), g = grad_fn(trainable, frozen, mb, totals)
      return jax.tree.map(jnp.add, carry, weighted(mb, l, m, g)), None

    rest = jax.tree.map(lambda x: x[1:], micro)
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, carry, rest)
    z = jnp.maximum(totals["tokens"], 1.0)
    metrics = {k: v if "tokens" in k else v / z for k, v in metrics.items()}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  applied = finite if apply is None else finite & apply
  updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  keep = lambda new, old: jnp.where(applied, new, old)
  new_trainable = jax.tree.map(keep, new_trainable, trainable)
  new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped_nonfinite=(~finite).astype(F32))
  return new_trainable, new_opt_state, metrics


def model_args(trainable, frozen, lora_enabled: bool):
  """(params, adapters) for the model: LoRA trains adapters beside frozen params; full fine-tuning trains params."""
  return (frozen, trainable) if lora_enabled else (trainable, None)


def _row_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def local_rows(mesh, global_rows: int) -> slice:
  """The rows of a [global_rows, ...] batch that this process's devices hold under put_batch's sharding: the
  rows a process builds and passes to put_batch. All rows for one process (or mesh=None)."""
  if mesh is None or jax.process_count() == 1:
    return slice(0, global_rows)
  spans = {(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
           for i in _row_sharding(mesh, 1).addressable_devices_indices_map((global_rows,)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  covered = set().union(*(range(a, b) for a, b in spans))
  if len(covered) != hi - lo:
    raise ValueError(f"local_rows: this process's devices hold rows {sorted(spans)} of the batch, not one "
                     "contiguous range; build the mesh with jopd.mesh.make_mesh (devices in process order)")
  return slice(lo, hi)


def put_batch(batch: dict[str, np.ndarray], mesh, global_rows: int | None = None) -> dict[str, jax.Array]:
  """Host arrays (this process's rows, `local_rows(mesh, global_rows)`) -> global arrays with rows sharded on
  ('data', 'fsdp'). Without `global_rows`, jax infers the global row count from the sharding (in one process:
  the rows given)."""
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  out = {}
  for k, v in batch.items():
    shape = None if global_rows is None else (global_rows, *v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(_row_sharding(mesh, v.ndim), v, shape)
  return out
