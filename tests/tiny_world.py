"""Tiny student/teacher checkpoints (HF directories with a trained tokenizer) and prompt JSONL for trainer tests."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np

from models import hf, qwen3
from tests import data_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(path, tokenizer, *, seed: int, hidden: int = 32, layers: int = 2, std: float = 0.3,
               params=None):
  """Saves a random tiny Qwen3 (or the given params) with `tokenizer` as a transformers checkpoint directory."""
  cfg = qwen3.Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                          rope_theta=10000.0)
  if params is None:
    params = qwen3.init_params(cfg, jax.random.key(seed), std=std)
  hf.save_pretrained(str(path), cfg, params)
  tokenizer.save_pretrained(str(path))
  return str(path), cfg, params


def perturbed(params, seed: int, scale: float):
  """params plus a fixed random perturbation: a teacher close to, but not equal to, the student."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def prompts_jsonl(path, n: int = 8, **extra) -> str:
  rows = [data_utils.prompt_row(f"What is {i} + {i + 1}?", **extra) for i in range(n)]
  return data_utils.write_jsonl(path, rows)


def world(tmp_path, *, teacher_scale: float = 0.3):
  tok = data_utils.tiny_tokenizer()
  student, cfg, params = make_model(tmp_path / "student", tok, seed=0)
  teacher, _, _ = make_model(tmp_path / "teacher", tok, seed=0, params=perturbed(params, 1, teacher_scale))
  data = prompts_jsonl(tmp_path / "rows.jsonl")
  return {"student": student, "teacher": teacher, "data": data, "tokenizer": tok}


def run_module(module: str, config: str, overrides: dict, *, env=None, timeout=600, check=True):
  """Runs `python -m module --config=config --config.k=v ...` in a subprocess (1 CPU device unless env says)."""
  args = [sys.executable, "-m", module, f"--config={os.path.join(REPO, config)}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  full_env.update(env or {})
  proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
  return proc


def final_trainable(log_path):
  from jopd import checkpoint
  tree, _ = checkpoint.load_trainable(os.path.join(str(log_path), "checkpoints"))
  return jax.tree.map(np.asarray, tree)
