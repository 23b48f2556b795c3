"""jopd/update.py: micro-batched gradient accumulation equals the whole-batch update (token_mean normalised by the
whole batch), and the learning rate each schedule applies, read back from Adam updates."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopd import config as config_lib
from jopd import train, update
from models import lora, qwen3

CFG = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
B, T = 8, 12


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (B, T), dtype=np.int32)
  loss_mask = np.zeros((B, T), bool)
  attention = np.ones((B, T), bool)
  for r in range(B - 2):  # completions of different lengths, so per-micro-batch token counts differ
    loss_mask[r, 3:3 + 2 + r] = True
  attention[B - 2:] = False  # two batch-padding rows (as train.build_batch pads to a bucket): no tokens
  tokens[B - 2:] = 0
  return {"tokens": tokens, "attention_mask": attention,
          "targets": np.pad(tokens[:, 1:], ((0, 0), (0, 1))), "loss_mask": loss_mask,
          "sampling_logprobs": np.where(loss_mask, rng.normal(-4.0, 0.5, (B, T)), 0.0).astype(np.float32),
          "advantages": np.where(loss_mask, rng.normal(0.0, 0.3, (B, T)), 0.0).astype(np.float32)}


@pytest.mark.parametrize("normalization, num_micro", [("sum", 2), ("token_mean", 4)])
def test_micro_batches_equal_the_whole_batch(normalization, num_micro):
  params = qwen3.init_params(CFG, jax.random.key(0), std=0.2)
  lcfg = lora.LoraConfig(rank=4)
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key == "b" else x, lora.init_adapters(CFG, lcfg, jax.random.key(1)))
  c = config_lib.opd()
  optimizer = update.make_optimizer(c, 10)
  loss_fn = functools.partial(train.opd_loss, CFG, True, lcfg.scale, 1.0, 20.0, normalization, 8)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}

  def step(n):
    # train_step donates its state: each call gets its own copies.
    a = jax.tree.map(jnp.copy, adapters)
    return update.train_step(a, optimizer.init(a), params, batch, loss_fn=loss_fn, optimizer=optimizer,
                             num_micro=n)

  whole, _, m1 = step(1)
  split, _, mn = step(num_micro)
  # fp32 sums in another order: relative 1e-5 on the loss, 1e-6 absolute on the updated adapters.
  np.testing.assert_allclose(float(mn["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(mn["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), split, whole)
  # Per-token metrics are the whole batch's too (token-weighted over micro-batches; with 4 micro-batches the last
  # is all padding, so a plain average of micro-batch means would be off by a quarter).
  for name in ("sampler_trainer_kl", "entropy", "ratio/mean", "tokens"):
    np.testing.assert_allclose(float(mn[name]), float(m1[name]), rtol=1e-5, err_msg=name)
  if normalization == "token_mean":
    # Normalised by each micro-batch's own token count instead, the loss would differ: the check can tell.
    rows = [slice(i * B // num_micro, (i + 1) * B // num_micro) for i in range(num_micro)]
    micro_loss = jax.jit(lambda mb: loss_fn(adapters, params, mb, {"tokens": jnp.sum(mb["loss_mask"])})[0])
    own = sum(float(micro_loss({k: v[r] for k, v in batch.items()})) for r in rows)
    assert abs(own - float(m1["loss"])) > 1e-3 * abs(float(m1["loss"]))


def test_micro_batch_count_splits_rows_evenly_into_at_most_micro_batch_size():
  assert update.num_micro_batches(16, 0) == 1 and update.num_micro_batches(8, 8) == 1
  assert update.num_micro_batches(16, 4) == 4
  # 16 rows at most 3 per micro-batch: 8 of 2 rows (16 // 3 = 5 would not split 16 rows).
  assert update.num_micro_batches(16, 3) == 8
  assert update.num_micro_batches(24, 5) == 6 and update.num_micro_batches(7, 2) == 7
  for rows in (1, 2, 6, 8, 12, 16, 24, 48):
    for size in range(1, 20):
      n = update.num_micro_batches(rows, size)
      assert rows % n == 0 and rows // n <= size, (rows, size, n)
      assert all(rows % m or rows // m > size for m in range(1, n)), (rows, size, n)  # the fewest such


def _applied_lrs(schedule, warmup, total, lr=1e-3, steps=None):
  """The learning rate of each step: with a constant positive gradient, Adam's bias-corrected step is
  lr_t * g / (|g| + eps), i.e. -lr_t to 1e-7 relative for g = 1."""
  c = config_lib.opd()
  c.learning_rate, c.lr_schedule, c.warmup_steps = lr, schedule, warmup
  opt = update.make_optimizer(c, total)
  x = {"w": jnp.zeros((3,))}
  state = opt.init(x)
  g = {"w": jnp.ones((3,))}
  out = []
  for _ in range(steps or total):
    updates, state = opt.update(g, state, x)
    out.append(-float(updates["w"][0]))
  return np.array(out)


def test_learning_rate_schedules_apply_the_documented_rates():
  lr, warmup, total = 1e-3, 2, 10
  rtol = 1e-5
  np.testing.assert_allclose(_applied_lrs("constant", 0, total), np.full(total, lr), rtol=rtol)
  # Warmup: linear from 0, reaching lr at step `warmup`.
  got = _applied_lrs("linear", warmup, total)
  np.testing.assert_allclose(got[:warmup], [0.0, lr / 2], rtol=rtol, atol=1e-12)
  # Linear decay over the remaining total - warmup steps, reaching 0 at the last step.
  decay = [lr * (1 - k / (total - warmup)) for k in range(total - warmup)]
  np.testing.assert_allclose(got[warmup:], decay, rtol=rtol, atol=1e-12)
  assert _applied_lrs("linear", warmup, total, steps=total + 1)[-1] == pytest.approx(0.0, abs=1e-12)
  cos = _applied_lrs("cosine", 0, total)
  np.testing.assert_allclose(cos, [lr * 0.5 * (1 + np.cos(np.pi * k / total)) for k in range(total)], rtol=rtol,
                             atol=1e-12)


def test_unknown_schedule_is_refused():
  c = config_lib.opd()
  c.lr_schedule = "step"
  with pytest.raises(ValueError, match=r"--config.lr_schedule='step'; expected 'constant', 'linear' or 'cosine'"):
    update.make_optimizer(c, 10)


def test_a_step_not_applied_returns_the_state_bit_identical_and_the_same_metrics():
  params = qwen3.init_params(CFG, jax.random.key(0), std=0.2)
  lcfg = lora.LoraConfig(rank=4)
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if p[-1].key == "b" else x, lora.init_adapters(CFG, lcfg, jax.random.key(1)))
  optimizer = update.make_optimizer(config_lib.opd(), 10)
  loss_fn = functools.partial(train.opd_loss, CFG, True, lcfg.scale, 1.0, 20.0, "sum", 8)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  opt = optimizer.init(adapters)
  want = jax.tree.map(np.asarray, (adapters, opt))

  def step(apply):
    a, o = jax.tree.map(jnp.copy, (adapters, opt))
    return update.train_step(a, o, params, batch, jnp.asarray(apply), loss_fn=loss_fn, optimizer=optimizer)

  kept_a, kept_o, m_kept = step(False)
  jax.tree.map(np.testing.assert_array_equal, (kept_a, kept_o), want)
  moved_a, _, m_moved = step(True)
  # The same program applied moves the adapters (so the check above can fail), with the same loss.
  assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(moved_a), jax.tree.leaves(want))) > 0
  assert float(m_kept["loss"]) == float(m_moved["loss"])
  assert update.train_step._cache_size() >= 1
