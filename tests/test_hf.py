"""models/hf.py: round trips with transformers, sharded checkpoints, and the errors for bad checkpoints."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import hf, qwen3
from tests import helpers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  ref = helpers.random_hf_model(seed=3)
  return ref, helpers.save_hf_model(ref, tmp_path_factory.mktemp("ckpt"))


def _copy(src, dst):
  os.makedirs(dst, exist_ok=True)
  for f in os.listdir(src):
    with open(os.path.join(src, f), "rb") as fi, open(os.path.join(dst, f), "wb") as fo:
      fo.write(fi.read())
  return str(dst)


def test_load_save_transformers_round_trip(checkpoint, tmp_path):
  import transformers
  ref, path = checkpoint
  cfg, params = hf.load_pretrained(path, dtype=jnp.float32)
  hf.save_pretrained(tmp_path / "out", cfg, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  tokens = np.random.RandomState(0).randint(0, 300, (2, 9))
  np.testing.assert_array_equal(helpers.hf_logits(reloaded, tokens), helpers.hf_logits(ref, tokens))
  # And jopd reading its own output gives bit-identical params.
  _, params2 = hf.load_pretrained(str(tmp_path / "out"), dtype=jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_checkpoint_with_index_loads(checkpoint, tmp_path):
  ref, path = checkpoint
  cfg, params = hf.load_pretrained(path, dtype=jnp.float32)
  hf.save_pretrained(tmp_path / "sharded", cfg, params, max_shard_bytes=40_000)
  files = os.listdir(tmp_path / "sharded")
  assert hf.INDEX_FILE in files
  assert len([f for f in files if f.endswith(".safetensors")]) > 3
  _, params2 = hf.load_pretrained(str(tmp_path / "sharded"), dtype=jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  # transformers' own sharded format loads too.
  ref.save_pretrained(str(tmp_path / "hf_sharded"), max_shard_size="50KB")
  assert hf.INDEX_FILE in os.listdir(tmp_path / "hf_sharded")
  _, params3 = hf.load_pretrained(str(tmp_path / "hf_sharded"), dtype=jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, params, params3)


def test_load_places_params_with_given_shardings(checkpoint):
  _, path = checkpoint
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cfg = qwen3.Qwen3Config.from_hf(path)
  P = jax.sharding.PartitionSpec
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, P()),
                           jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0))))
  shardings["layers"]["q"] = jax.sharding.NamedSharding(mesh, P(None, "fsdp", "tensor", None))
  _, params = hf.load_pretrained(path, dtype=jnp.bfloat16, shardings=shardings)
  q = params["layers"]["q"]
  assert q.dtype == jnp.bfloat16 and q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 32, 1, 24)
  _, plain = hf.load_pretrained(path, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(plain["layers"]["q"]))


def _rewrite_tensors(path, edit):
  file = os.path.join(path, hf.SINGLE_FILE)
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint, tmp_path):
  path = _copy(checkpoint[1], tmp_path / "c")
  _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointError, match=re.escape(
      f"{path}: missing tensor 'model.layers.1.mlp.up_proj.weight' (1 missing in all)")):
    hf.load_pretrained(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
  path = _copy(checkpoint[1], tmp_path / "c")
  _rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(96, np.float32)}))
  with pytest.raises(hf.CheckpointError, match=re.escape(
      "unexpected tensor 'model.layers.0.self_attn.q_proj.bias' (1 unexpected in all)")):
    hf.load_pretrained(path)


def test_wrong_shape_is_named(checkpoint, tmp_path):
  path = _copy(checkpoint[1], tmp_path / "c")
  _rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((40, 64),
                                                                                                  np.float32)}))
  with pytest.raises(hf.CheckpointError, match=re.escape(
      "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (40, 64), expected (48, 64) from config.json")):
    hf.load_pretrained(path)


def test_truncated_safetensors_is_refused(checkpoint, tmp_path):
  path = _copy(checkpoint[1], tmp_path / "c")
  file = os.path.join(path, hf.SINGLE_FILE)
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(hf.CheckpointError, match="not a readable safetensors file|is the file truncated"):
    hf.load_pretrained(path)


def test_pickle_only_checkpoint_is_refused(checkpoint, tmp_path):
  path = tmp_path / "bin_only"
  path.mkdir()
  (path / "config.json").write_text(open(os.path.join(checkpoint[1], "config.json")).read())
  (path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(hf.CheckpointError, match=re.escape(
      "only pytorch_model.bin found. jopd loads safetensors only and never unpickles a checkpoint; convert it")):
    hf.load_pretrained(str(path))


BASE = helpers.hf_config().to_dict()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "field 'model_type': got 'llama', expected 'qwen3'"),
    ({"model_type": "qwen3_moe"}, "expected 'qwen3' (Qwen3-MoE is not implemented yet)"),
    ({"use_sliding_window": True}, "field 'use_sliding_window': sliding-window attention is not implemented"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     "field 'rope_parameters': rope_type 'yarn' is not implemented (only 'default')"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     "field 'rope_scaling': rope_type 'linear' is not implemented"),
    ({"attention_bias": True}, "field 'attention_bias': attention projections with bias are not implemented"),
    ({"hidden_act": "gelu"}, "field 'hidden_act': got 'gelu', only 'silu' is implemented"),
    ({"num_experts": 8}, "field 'num_experts': mixture-of-experts configs are not supported"),
    ({"layer_types": ["full_attention", "sliding_attention"]},
     "field 'layer_types': only 'full_attention' layers are implemented, got 'sliding_attention'"),
    ({"partial_rotary_factor": 0.5}, "field 'partial_rotary_factor': partial_rotary_factor=0.5 is not implemented"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}},
     "field 'rope_parameters': partial_rotary_factor=0.25 is not implemented"),
])
def test_unsupported_config_fields_are_refused(change, message):
  with pytest.raises(qwen3.UnsupportedConfigError, match=re.escape(message)):
    qwen3.Qwen3Config.from_hf({**BASE, **change})


def test_missing_required_config_field_is_named(tmp_path):
  raw = dict(BASE)
  del raw["intermediate_size"]
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(qwen3.UnsupportedConfigError, match=re.escape(
      f"{tmp_path}/config.json: field 'intermediate_size': required field is missing")):
    qwen3.Qwen3Config.from_hf(tmp_path)


def test_rope_theta_read_from_either_place():
  legacy = {k: v for k, v in BASE.items() if k != "rope_parameters"} | {"rope_theta": 123.0}
  assert qwen3.Qwen3Config.from_hf(legacy).rope_theta == 123.0
  nested = {k: v for k, v in BASE.items() if k != "rope_theta"} | {
      "rope_parameters": {"rope_type": "default", "rope_theta": 456.0}}
  assert qwen3.Qwen3Config.from_hf(nested).rope_theta == 456.0


def test_defaults_and_precedence_follow_transformers():
  """A config.json that leaves head_dim out, or sets rope_theta in both places, means what transformers reads."""
  import transformers
  both = BASE | {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
  no_head_dim = {k: v for k, v in BASE.items() if k != "head_dim"}
  for raw in (both, no_head_dim):
    ref = transformers.Qwen3Config.from_dict(raw)
    cfg = qwen3.Qwen3Config.from_hf(raw)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.head_dim == ref.head_dim
  assert qwen3.Qwen3Config.from_hf(no_head_dim).head_dim != BASE["hidden_size"] // BASE["num_attention_heads"]
