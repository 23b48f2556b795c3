"""Tests for jopd/data/packing.py: packed rows compute exactly what each conversation computes alone, targets
never cross a segment boundary, and padding stays small on a reasoning-trace-like length distribution."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopd.data import packing
from models import qwen3

CFG = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, rope_theta=10_000.0)


def _examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.integers(1, CFG.vocab_size, n).astype(np.int32), (rng.random(n) < 0.7).astype(np.float32))
          for n in lengths]


@pytest.fixture(scope="module")
def params():
  return jax.jit(qwen3.init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0), std=0.2)


_jit_forward = jax.jit(qwen3.forward, static_argnums=0)


def _forward(params, batch):
  return np.asarray(_jit_forward(CFG, params, batch["tokens_bt"], packing.attention_mask(batch),
                                 positions_bt=batch["positions_bt"], segment_ids_bt=batch["segment_ids_bt"]))


def _nll(logits_tv, targets_t, weights_t):
  logits_tv = logits_tv.astype(np.float64)
  logz_t = np.log(np.exp(logits_tv - logits_tv.max(-1, keepdims=True)).sum(-1)) + logits_tv.max(-1)
  return float(np.sum((logz_t - logits_tv[np.arange(len(targets_t)), targets_t]) * weights_t))


def test_layout_shifts_targets_within_segments_only():
  examples = [(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], np.float32)),
              (np.array([8, 9], np.int32), np.array([1, 1], np.float32))]
  batch = packing.pack_rows(examples, [[0, 1]], seq_len=7, pad_id=0)
  np.testing.assert_array_equal(batch["tokens_bt"], [[5, 6, 7, 8, 9, 0, 0]])
  # Position p predicts token p + 1 of its own segment; each segment's last position predicts nothing, so the
  # 7 -> 8 transition between conversations carries no loss, and weights[0] (no predecessor) is dropped.
  np.testing.assert_array_equal(batch["targets_bt"], [[6, 7, 0, 9, 0, 0, 0]])
  np.testing.assert_array_equal(batch["weights_bt"], [[1, 1, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids_bt"], [[1, 1, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(batch["positions_bt"], [[0, 1, 2, 0, 1, 0, 0]])
  assert packing.padding_frac(batch) == pytest.approx(2 / 7)


def test_packed_logits_and_loss_equal_each_conversation_alone(params):
  examples = _examples([20, 17, 11, 30, 9])
  bins, unplaced = packing.first_fit([len(t) for t, _ in examples], [3, 0, 1, 2, 4], num_bins=2, capacity=50)
  assert unplaced == [] and bins == [[3, 0], [1, 2, 4]]
  batch = packing.pack_rows(examples, bins, seq_len=50)
  logits_btv = _forward(params, batch)
  packed_nll = _nll(logits_btv.reshape(-1, CFG.vocab_size), batch["targets_bt"].reshape(-1),
                    batch["weights_bt"].reshape(-1))
  # Alone: one conversation per row, right-padded, through the plain (unpacked) forward path; causal attention
  # means the right padding cannot reach a conversation's own positions.
  alone = packing.pad_rows(examples, seq_len=30)
  alone_btv = np.asarray(_jit_forward(CFG, params, alone["tokens_bt"], packing.attention_mask(alone)))
  alone_nll = 0.0
  for r, row in enumerate(bins):
    start = 0
    for i in row:
      tokens, weights = examples[i]
      alone_tv = alone_btv[i, :len(tokens)]
      np.testing.assert_allclose(logits_btv[r, start:start + len(tokens)], alone_tv, atol=1e-5, rtol=0)
      alone_nll += _nll(alone_tv[:-1], tokens[1:], weights[1:])  # the textbook shift, one conversation
      start += len(tokens)
  np.testing.assert_allclose(packed_nll, alone_nll, rtol=1e-5)


def test_no_attention_across_segments(params):
  examples = _examples([12, 15, 10])
  batch = packing.pack_rows(examples, [[0, 1, 2]], seq_len=40)
  changed = {k: v.copy() for k, v in batch.items()}
  changed["tokens_bt"][0, 3] = (changed["tokens_bt"][0, 3] + 1) % CFG.vocab_size
  before, after = _forward(params, batch), _forward(params, changed)
  assert np.abs(before[0, 3:12] - after[0, 3:12]).max() > 1e-3  # the edit matters inside its own segment
  np.testing.assert_array_equal(before[0, :3], after[0, :3])  # causal: earlier positions untouched
  np.testing.assert_array_equal(before[0, 12:37], after[0, 12:37])  # segments 2 and 3: bit-identical


def _lognormal_lengths(n, max_length, seed=0):
  # Reasoning traces: a long right tail (median ~300 tokens here, ~6% reach max_length and are truncated).
  rng = np.random.default_rng(seed)
  return np.clip(rng.lognormal(np.log(300), 0.8, n), 16, max_length).astype(int).tolist()


def test_stream_packing_keeps_padding_small_and_every_example_once():
  seq_len, batch_size = 1024, 8
  examples = _examples(_lognormal_lengths(200, seq_len))
  batches = list(packing.pack_stream(examples, batch_size, seq_len))
  # Every example comes out exactly once, whole: recover segments and match them against the inputs.
  seen = []
  for batch in batches:
    for r in range(batch_size):
      seg_t = batch["segment_ids_bt"][r]
      for s in range(1, seg_t.max() + 1):
        seen.append(tuple(batch["tokens_bt"][r][seg_t == s]))
  assert sorted(seen) == sorted(tuple(t) for t, _ in examples)

  total_tokens = sum(len(t) for t, _ in examples)
  packed_frac = 1 - total_tokens / (len(batches) * batch_size * seq_len)
  steady_frac = float(np.mean([packing.padding_frac(b) for b in batches[:-1]]))
  naive_frac = packing.padding_frac(packing.pad_rows(examples, seq_len))
  print(f"\npadding_frac on 200 lognormal examples (T={seq_len}, B={batch_size}): packed {packed_frac:.3f} "
        f"over {len(batches)} batches incl. the flushed tail, {steady_frac:.3f} excluding it; "
        f"naive one-per-row {naive_frac:.3f}")
  assert steady_frac < 0.05 and packed_frac < 0.10
  assert naive_frac > 0.5  # the distribution is one where packing matters
  assert [packing.padding_frac(b) for b in batches] == [
      packing.padding_frac(b) for b in packing.pack_stream(examples, batch_size, seq_len)]  # deterministic


def test_restored_packer_continues_identically():
  # The state is JSON (keys, lengths, ages): a packer restored from it mid-stream, with examples still waiting
  # in the buffer, emits exactly the bins the uninterrupted packer does.
  seq_len, batch_size = 256, 4
  lengths = _lognormal_lengths(120, seq_len, seed=1)

  def run(packer, keys):
    out = []
    for key in keys:
      packer.add(key, lengths[key])
      while packer.ready():
        out.append(packer.pop())
    return out

  reference = run(packing.StreamPacker(batch_size, seq_len), range(120))
  first = packing.StreamPacker(batch_size, seq_len)
  head = run(first, range(70))
  assert len(first) > 0  # the checkpoint is taken with examples waiting in the buffer
  restored = packing.StreamPacker(batch_size, seq_len)
  restored.set_state(json.loads(json.dumps(first.get_state())))
  resumed = head + run(restored, range(70, 120))
  assert resumed == reference and len(reference) > 10


def test_no_length_starves():
  # Long examples arrive with a few shorter ones that longest-first packing would always postpone (each row
  # holds one example, and there is always a longer one waiting): aging must emit every example within a few
  # arrivals. Without it the first short one waits ~50 arrivals and the rest never leave before the flush.
  seq_len, batch_size = 100, 2
  packer = packing.StreamPacker(batch_size, seq_len, buffer_batches=2.0, max_wait=2)
  arrivals_until_out = {}
  for step in range(60):
    packer.add(step, 60 if step % 10 == 3 else 70)
    while packer.ready():
      for example_id in (k for row in packer.pop() for k in row):
        arrivals_until_out[example_id] = step - example_id
  assert all(s in arrivals_until_out for s in range(50)), sorted(arrivals_until_out)
  assert max(arrivals_until_out.values()) <= 8, arrivals_until_out


def test_errors_name_the_example_and_the_limit():
  packer = packing.StreamPacker(2, 8)
  packer.add(0, 3)
  with pytest.raises(ValueError, match=r"example 7, arrival #1.*length 9.*max_length <= 8"):
    packer.add(7, 9)
  with pytest.raises(ValueError, match=r"example #1.*equal length"):
    list(packing.pack_stream([(np.arange(3), np.ones(3)), (np.arange(4), np.ones(3))], 2, 8))
