"""Mesh and partition rules on 8 simulated CPU devices: sharded logits/gradients equal one device's, leaves carry
the shardings the rules table says, non-dividing axes are dropped with a warning, multi-host env parsing."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jopd import mesh as mesh_lib
from models import hf, lora, qwen3

CFG = qwen3.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=10000.0)
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)


def random_params(cfg, seed=0, std=0.1):
  rng = np.random.default_rng(seed)
  flat = {p: (1.0 + 0.2 * rng.standard_normal(d.shape) if d.init == "ones" else std * rng.standard_normal(d.shape))
          for p, d in qwen3.param_decls(cfg).items()}
  return qwen3.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in flat.items()})


def random_adapters(cfg, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda d: jnp.asarray(0.1 * rng.standard_normal(d.shape), jnp.float32),
                      qwen3.unflatten(lora.adapter_decls(cfg, LORA)),
                      is_leaf=lambda x: isinstance(x, lora.AdapterDecl))


def _loss(adapters, params, tokens_bt):
  logits = qwen3.forward(CFG, params, tokens_bt, adapters=adapters, lora_scale=LORA.scale)
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)
  return nll.mean(), logits


@pytest.fixture(scope="module")
def reference():
  params, adapters = random_params(CFG), random_adapters(CFG)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (8, 12)), jnp.int32)
  (loss, logits), grads = jax.jit(jax.value_and_grad(_loss, has_aux=True))(adapters, params, tokens)
  return params, adapters, tokens, np.asarray(logits), jax.tree.map(np.asarray, grads)


def _warned_paths(caplog):
  return {r.args[0] for r in caplog.records if r.name == "jopd.mesh" and r.levelno == logging.WARNING}


@pytest.mark.parametrize("shape,warned", [
    ((8, 1, 1), set()),
    ((2, 2, 2), set()),
    ((1, 2, 4), {"layers/k", "layers/v", "layers/k/b", "layers/v/b"}),    # 2 kv heads on tensor=4
    ((1, 1, 8), {"layers/q", "layers/k", "layers/v", "layers/o", "layers/q/b", "layers/k/b", "layers/v/b",
                 "layers/o/a"}),                                          # 4 heads on tensor=8
])
def test_sharded_logits_and_grads_equal_one_device(reference, shape, warned, caplog):
  params, adapters, tokens, ref_logits, ref_grads = reference
  mesh = mesh_lib.make_mesh(*shape)
  with caplog.at_level(logging.WARNING, logger="jopd.mesh"):
    p_sh, a_sh = mesh_lib.shardings_for(params, mesh), mesh_lib.shardings_for(adapters, mesh)
    t_sh = mesh_lib.shardings_for({"batch": {"tokens": tokens}}, mesh)["batch"]["tokens"]
  assert _warned_paths(caplog) == warned
  params_s, adapters_s = jax.device_put(params, p_sh), jax.device_put(adapters, a_sh)
  tokens_s = jax.device_put(tokens, t_sh)

  d, f, t = shape
  tensor_heads = "tensor" if 4 % t == 0 else None
  tensor_kv = "tensor" if 2 % t == 0 else None
  assert params_s["layers"]["q"].sharding.spec == P(None, "fsdp", tensor_heads, None)
  assert params_s["layers"]["k"].sharding.spec == P(None, "fsdp", tensor_kv, None)
  assert params_s["layers"]["o"].sharding.spec == P(None, tensor_heads, None, "fsdp")
  assert params_s["layers"]["down"].sharding.spec == P(None, "tensor", "fsdp")
  assert params_s["embed"].sharding.spec == P("tensor", "fsdp")
  assert params_s["lm_head"].sharding.spec == P("fsdp", "tensor")
  assert params_s["layers"]["attn_norm"].sharding.spec == P(None, None)
  assert params_s["final_norm"].sharding.spec == P(None)
  assert adapters_s["layers"]["q"]["a"].sharding.spec == P(None, "fsdp", None)
  assert adapters_s["layers"]["q"]["b"].sharding.spec == P(None, None, tensor_heads, None)
  assert adapters_s["layers"]["o"]["a"].sharding.spec == P(None, tensor_heads, None, None)
  assert adapters_s["layers"]["o"]["b"].sharding.spec == P(None, None, "fsdp")
  assert adapters_s["lm_head"]["b"].sharding.spec == P(None, "tensor")
  assert tokens_s.sharding.spec == P(("data", "fsdp"), None)
  if t > 1 and tensor_heads:  # really split across devices, not just labelled
    assert params_s["layers"]["q"].addressable_shards[0].data.shape == (2, 64 // f, 4 // t, 16)

  step = jax.jit(jax.value_and_grad(_loss, has_aux=True), out_shardings=((None, None), a_sh))
  (_, logits), grads = step(adapters_s, params_s, tokens_s)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), r, atol=1e-5, rtol=0), grads, ref_grads)
  leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, g in leaves:
    assert g.sharding.spec == mesh_lib.spec_for(mesh_lib.path_str(path), g.shape, mesh)


def test_optimizer_state_cache_and_batch_rules(caplog):
  mesh = mesh_lib.make_mesh(2, 2, 2)
  adapters = jax.eval_shape(lambda: random_adapters(CFG))
  opt_state = jax.eval_shape(optax.adam(1e-3).init, adapters)
  sh = mesh_lib.shardings_for(opt_state, mesh)
  assert sh[0].mu["layers"]["q"]["b"].spec == P(None, None, "tensor", None)
  assert sh[0].nu["layers"]["down"]["a"].spec == P(None, "tensor", None)
  assert sh[0].count.spec == P()
  cache = jax.eval_shape(lambda: qwen3.init_cache(CFG, batch=8, max_len=16))
  cache_sh = mesh_lib.shardings_for(cache, mesh)
  assert cache_sh["k"].spec == P(None, ("data", "fsdp"), None, "tensor", None)
  assert cache_sh["valid"].spec == P(("data", "fsdp"), None)
  assert cache_sh["index"].spec == P()
  with caplog.at_level(logging.WARNING, logger="jopd.mesh"):
    batch = {"batch": {"tokens": jax.ShapeDtypeStruct((2, 16), jnp.int32),
                       "advantages": jax.ShapeDtypeStruct((8, 16), jnp.float32)},
             "mystery": jax.ShapeDtypeStruct((3, 3), jnp.float32)}
    batch_sh = mesh_lib.shardings_for(batch, mesh)
  # batch of 2 on data*fsdp=4: keeps 'data', drops 'fsdp' (warned); unknown leaves are replicated, warned
  assert batch_sh["batch"]["tokens"].spec == P("data", None)
  assert batch_sh["batch"]["advantages"].spec == P(("data", "fsdp"), None)
  assert batch_sh["mystery"].spec == P()
  assert _warned_paths(caplog) == {"batch/tokens", "mystery"}


def test_load_pretrained_places_params_into_shards(tmp_path):
  params = random_params(CFG)
  hf.save_pretrained(str(tmp_path), CFG, params)
  mesh = mesh_lib.make_mesh(1, 4, 2)
  abstract = jax.eval_shape(lambda: params)
  _, loaded = hf.load_pretrained(str(tmp_path), dtype=jnp.float32, shardings=mesh_lib.shardings_for(abstract, mesh))
  assert loaded["layers"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
  np.testing.assert_array_equal(np.asarray(loaded["layers"]["q"]), np.asarray(params["layers"]["q"]))


def test_make_mesh_fills_and_refuses():
  assert dict(mesh_lib.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(mesh_lib.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="product is 8"):
    mesh_lib.make_mesh(2, 2, 1)
  with pytest.raises(ValueError, match="not divisible by 3"):
    mesh_lib.make_mesh(3, -1, 1)


def test_cluster_from_env():
  explicit = {"JOPD_COORDINATOR": "127.0.0.1:1234", "JOPD_NUM_PROCESSES": "2", "JOPD_PROCESS_ID": "1"}
  assert mesh_lib.cluster_from_env(explicit) == {
      "kind": "explicit", "coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert mesh_lib.cluster_from_env(explicit | {"JOPD_NUM_PROCESSES": "1", "JOPD_PROCESS_ID": "0"}) is None
  with pytest.raises(ValueError, match="JOPD_PROCESS_ID is not set"):
    mesh_lib.cluster_from_env({"JOPD_COORDINATOR": "h:1", "JOPD_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match=r"JOPD_PROCESS_ID=2 must be in \[0, JOPD_NUM_PROCESSES=2\)"):
    mesh_lib.cluster_from_env(explicit | {"JOPD_PROCESS_ID": "2"})
  assert mesh_lib.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {"kind": "slurm"}
  assert mesh_lib.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert mesh_lib.cluster_from_env({}) is None   # this CPU machine is not a Cloud TPU VM


def test_initialize_single_process_is_a_noop(caplog):
  with caplog.at_level(logging.INFO, logger="jopd.mesh"):
    mesh_lib.initialize({})
  assert not jax.distributed.is_initialized()
  assert any("process 0 of 1" in r.getMessage() for r in caplog.records)
