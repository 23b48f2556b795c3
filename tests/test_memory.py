"""jopd.memory: the prediction against XLA's memory analysis of the real programs, and per-device accounting
against jopd.mesh's sharding of real arrays."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopd import config as config_lib, memory, plan, update
from jopd import mesh as mesh_lib
from models import lora, qwen3

# Small enough to compile in ~30 s, large enough that the tensors the model counts dominate XLA's fixed overheads.
CFG = qwen3.Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=64, tie_word_embeddings=True, remat="full")
LORA = lora.LoraConfig(rank=8)
TOLERANCE = 0.25   # |predicted / XLA - 1| (the bench model is within 0.10; tiny shapes have more fixed overhead)


def _workload(cfg=CFG):
  return plan.Workload(cfg, cfg, LORA, jnp.bfloat16, memory.SampleShape(4, 32, 64), memory.ScoreShape(4, 256, 128),
                       memory.TrainShape(4, 256), update.make_optimizer(config_lib.opd(), 10))


def test_prediction_matches_xla_memory_analysis_on_one_device():
  w = _workload()
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  measured = plan.compile_all(w, mesh)
  predicted = plan.predict(w, None, cpu=True)
  for name in plan.PROGRAMS:
    ratio = predicted[name]["peak"] / measured[name]["peak"]
    assert abs(ratio - 1) < TOLERANCE, (name, ratio, predicted[name], measured[name])
    # Arguments are known exactly: weights (+ adapters, optimizer state, inputs) as XLA lays them out.
    if name == "train_step":
      args = sum(predicted[name][k] for k in ("weights", "trainable", "opt_state", "inputs"))
      assert abs(args - measured[name]["arguments"]) < 0.01 * measured[name]["arguments"] + 1024


def test_weight_bytes_halve_when_fsdp_or_tensor_doubles():
  base = memory.param_bytes(CFG, jnp.bfloat16, None)
  assert base == CFG.num_params * 2
  fsdp2 = memory.param_bytes(CFG, jnp.bfloat16, {"fsdp": 2})
  fsdp4 = memory.param_bytes(CFG, jnp.bfloat16, {"fsdp": 4})
  # Norms are replicated: everything else halves.
  norms = sum(np.prod(d.shape) for p, d in qwen3.param_decls(CFG).items() if "norm" in p) * 2
  assert fsdp2 - norms == (base - norms) // 2
  assert fsdp4 - norms == (base - norms) // 4
  assert memory.param_bytes(CFG, jnp.bfloat16, {"tensor": 2}) - norms == (base - norms) // 2
  # 'data' replicates weights.
  assert memory.param_bytes(CFG, jnp.bfloat16, {"data": 8}) == base


def test_kv_cache_shards_on_batch_and_kv_heads_but_not_when_an_axis_does_not_divide():
  kv = lambda mesh: memory.kv_cache_bytes(CFG, 8, 128, jnp.bfloat16, mesh)
  one = kv(None)
  small = 64   # the replicated slot index and per-row positions
  assert kv({"data": 2}) == pytest.approx(one / 2, abs=small)
  assert kv({"fsdp": 2, "data": 2}) == pytest.approx(one / 4, abs=small)
  k_and_v = 2 * CFG.num_layers * 8 * 128 * CFG.num_kv_heads * CFG.head_dim * 2
  assert kv({"tensor": 2}) == one - k_and_v // 2          # 2 KV heads over 2 devices
  assert kv({"tensor": 4}) == one                          # 2 KV heads do not split 4 ways: replicated


def test_tree_bytes_equals_the_real_shards_of_arrays_placed_by_the_mesh_rules():
  mesh = mesh_lib.make_mesh(2, 2, 2)   # the 8 simulated devices of tests/conftest.py
  cfg = dataclasses.replace(CFG, tie_word_embeddings=False)
  params = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0), jnp.bfloat16))
  adapters = jax.eval_shape(lambda: lora.init_adapters(cfg, dataclasses.replace(LORA, lm_head=True),
                                                       jax.random.key(1)))
  for tree in (params, adapters):
    placed = jax.tree.map(lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh), tree,
                          mesh_lib.shardings_for(tree, mesh))
    device = mesh.devices.flat[0]
    real = sum(s.data.nbytes for x in jax.tree.leaves(placed) for s in x.addressable_shards if s.device == device)
    assert memory.tree_bytes(tree, mesh) == real


def test_full_fine_tuning_counts_fp32_weights_as_trainable_with_adam_moments():
  full = lora.LoraConfig(rank=0)
  pred = memory.train_step(CFG, full, memory.TrainShape(4, 256), jnp.bfloat16)
  assert pred["weights"] == 0 and pred["trainable"] == CFG.num_params * 4
  assert pred["opt_state"] == 2 * pred["trainable"]
  lora_pred = memory.train_step(CFG, LORA, memory.TrainShape(4, 256), jnp.bfloat16)
  assert lora_pred["trainable"] == sum(np.prod(d.shape) for d in lora.adapter_decls(CFG, LORA).values()) * 4


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_saved_activations_shrink_with_remat_and_grow_with_layers(remat):
  shape = memory.TrainShape(4, 256)
  pred = lambda **kw: memory.train_step(dataclasses.replace(CFG, remat=remat, **kw), LORA, shape,
                                        jnp.bfloat16)["saved_activations"]
  assert pred(num_layers=4) == 2 * pred(num_layers=2)
  order = {"none": 3, "dots": 2, "full": 1}
  others = [memory.train_step(dataclasses.replace(CFG, remat=r), LORA, shape, jnp.bfloat16)["saved_activations"]
            for r in order if order[r] < order[remat]]
  assert all(pred(num_layers=2) > o for o in others)
