"""python -m jopd.plan: known model shapes, device kinds, mesh parsing, and a real run that compiles the four
programs over 4 simulated devices in a subprocess."""
import json
import os
import subprocess
import sys

import pytest

from jopd import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_known_models_have_their_published_sizes():
  assert abs(plan.model_config("Qwen/Qwen3-8B").num_params / 1e9 - 8.19) < 0.01
  assert abs(plan.model_config("Qwen3-32B").num_params / 1e9 - 32.76) < 0.01
  assert plan.model_config("Qwen/Qwen3-8B-Base") == plan.model_config("Qwen3-8B")
  assert plan.model_config("Qwen3-0.6B", remat="full").remat == "full"
  with pytest.raises(ValueError, match="neither a known name"):
    plan.model_config("Qwen/Qwen3-7B")


def test_device_kinds_and_mesh_parsing():
  assert plan.device_kind("v5p-64", 1)[:2] == (32, 95 * 2**30)
  assert plan.device_kind("v6e-8", 1)[0] == 8
  assert plan.device_kind("", 4)[:2] == (4, None)
  assert plan.parse_mesh("1,-1,2", 32) == {"data": 1, "fsdp": 16, "tensor": 2}
  with pytest.raises(ValueError, match="has 8 devices"):
    plan.parse_mesh("2,2,2", 16)
  with pytest.raises(ValueError, match="KIND-N"):
    plan.device_kind("tpu-64", 1)


def test_plan_compiles_the_real_programs_on_a_1_2_2_mesh_and_prints_both_numbers(tmp_path):
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text(json.dumps(dict(
      model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False)))
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)   # plan sets the simulated device count itself (conftest's 8 must not leak in)
  out = subprocess.run(
      [sys.executable, "-m", "jopd.plan", "--config=configs/tiny_opd.py", "--config.param_dtype=bfloat16",
       "--config.remat=full", "--config.groups_per_batch=4", "--config.max_tokens=32", "--mesh=1,2,2",
       f"--student={model}", f"--teacher={model}", "--layers=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "predicted / XLA:CPU" in out.stdout and "peak (predicted)" in out.stdout
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4 and result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  for key in ("predicted", "predicted_xla_cpu", "xla_cpu", "compile_s"):
    assert set(result[key]) == set(plan.PROGRAMS), key
    assert all(v > 0 for v in result[key].values()), (key, result[key])
