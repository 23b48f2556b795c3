"""Checkpointer: bit-exact round trips (sharded arrays, bf16, typed keys, JSON state), atomic latest step, retention,
weights-only loading, and refusals that name the offending field or tensor."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jopd import checkpoint, mesh as mesh_lib


def _state(seed=0):
  rng = np.random.default_rng(seed)
  trainable = {"layers": {"q": {"a": jnp.asarray(rng.standard_normal((2, 16, 4)), jnp.float32),
                                "b": jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)}},
               "embed": jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)}
  opt = optax.adam(1e-3)
  opt_state = opt.init(trainable)
  _, opt_state = opt.update(trainable, opt_state, trainable)   # non-trivial mu/nu/count
  return {"trainable": trainable, "opt_state": opt_state, "rng": jax.random.key(seed),
          "step": jnp.asarray(seed, jnp.int32)}


DATA_STATE = {"iterator": {"next_index": 17, "epoch": 1, "seed": 3}, "skipped": [0, 2.5, "x"]}
META = {"model_name": "/ckpts/Qwen3-8B", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ["q", "lm_head"],
        "note": "ünïcode"}


def _assert_state_equal(got, want):
  got_keys, want_keys = got.pop("rng"), want.pop("rng")
  np.testing.assert_array_equal(jax.random.key_data(got_keys), jax.random.key_data(want_keys))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8), np.asarray(w).reshape(-1).view(np.uint8))


def test_round_trip_is_bit_exact_and_reshards(tmp_path):
  save_mesh = mesh_lib.make_mesh(2, 4, 1)
  state = _state(3)
  state = jax.device_put(state, mesh_lib.shardings_for(state, save_mesh))
  assert state["trainable"]["layers"]["q"]["a"].sharding.spec == P(None, "fsdp", None)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(5, state, data_state=DATA_STATE, meta=META)
    ckpt.wait()
    assert ckpt.latest_step() == 5
    assert not ckpt.save(5, state, data_state=DATA_STATE, meta=META)   # an existing step is never overwritten

  # A restarted run on another mesh: every leaf lands with the sharding its abstract leaf asks for.
  load_mesh = mesh_lib.make_mesh(1, 1, 8)
  abstract = jax.eval_shape(lambda: _state(0))
  shardings = mesh_lib.shardings_for(abstract, load_mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored, data_state, meta = checkpoint.Checkpointer(tmp_path).restore(abstract_state=abstract)
  assert data_state == DATA_STATE and meta == META
  assert restored["trainable"]["embed"].sharding == NamedSharding(load_mesh, P("tensor", "fsdp"))
  assert restored["opt_state"][0].mu["layers"]["q"]["b"].sharding == shardings["opt_state"][0].mu["layers"]["q"]["b"]
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  _assert_state_equal(restored, _state(3))

  host, _, _ = checkpoint.Checkpointer(tmp_path).restore(5)   # no abstract state: host numpy arrays
  assert isinstance(host["trainable"]["embed"], np.ndarray) and host["trainable"]["embed"].dtype == jnp.bfloat16


def test_unfinished_save_is_never_the_latest(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(1), data_state={"i": 1})
    ckpt.save(2, _state(2), data_state={"i": 2})
    ckpt.wait()
  # What a save killed before its final rename leaves behind: a complete-looking temporary directory.
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1700000000123456")
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
  state, data_state, _ = ckpt.restore()
  assert data_state == {"i": 2}
  assert int(state["step"]) == 2


def test_max_to_keep_and_missing_steps(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, {"trainable": {"w": jnp.full((2,), step, jnp.float32)}})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 1; available: \[3, 4\]"):
      ckpt.restore(1)
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    checkpoint.Checkpointer(tmp_path / "empty").restore()


def test_load_trainable_reads_weights_only(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, _state(7), meta=META)
    ckpt.save(9, {"params": {"w": jnp.zeros((2,))}})
  trainable, meta = checkpoint.load_trainable(tmp_path, step=7)
  assert meta == META
  assert set(trainable) == {"layers", "embed"} and isinstance(trainable["embed"], np.ndarray)
  np.testing.assert_array_equal(trainable["layers"]["q"]["a"], np.asarray(_state(7)["trainable"]["layers"]["q"]["a"]))
  with pytest.raises(KeyError, match=r"/9: state has no 'trainable' subtree \(has \['params'\]\)"):
    checkpoint.load_trainable(tmp_path)


def test_refusals_name_the_field_or_tensor(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(TypeError, match=r"meta\['lora'\]\['targets'\] is a tuple"):
    ckpt.save(1, _state(), meta={"lora": {"targets": ("q",)}})
  ckpt.save(1, _state())
  ckpt.wait()
  abstract = jax.eval_shape(lambda: _state())
  bad = jax.tree.map(lambda x: x, abstract)
  bad["trainable"]["layers"]["q"]["a"] = jax.ShapeDtypeStruct((2, 16, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"'trainable/layers/q/a' was saved as float32\[2, 16, 4\], abstract_state "
                                       r"asks for float32\[2, 16, 8\]"):
    ckpt.restore(abstract_state=bad)
  del abstract["trainable"]["embed"]
  with pytest.raises(ValueError, match="'trainable/embed' is saved but not in abstract_state"):
    ckpt.restore(abstract_state=abstract)
