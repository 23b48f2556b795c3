"""Shared bench helpers: the issue-9 bench model built once for both jopd and transformers (same weights),
thread settings, timers, a per-program compile-time recorder, and the one-JSON-line-per-result printer.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Any, Callable

# Set before torch starts OpenMP: on a shared, oversubscribed machine, spinning OpenMP workers wait on descheduled
# peers (measured here under load: a 54M-param fp32 token took 430 ms with spinning, 56 ms with PASSIVE).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from models import hf

# Qwen3, vocab 32000, hidden 512, MLP 1536, 12 layers, 8 heads / 4 KV heads of 64, tied embeddings: 54.1M params.
BENCH_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                   rope_theta=1_000_000.0, max_position_embeddings=4096)
DTYPES = {"fp32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}


def set_threads() -> int:
  """torch gets as many intra-op threads as XLA's CPU client uses: one per core this process may run on, so
  `taskset -c 0 python -m bench.sample` compares one thread against one thread."""
  n = len(os.sched_getaffinity(0))
  torch.set_num_threads(n)
  return n


def start(bench: str, note: str = "") -> None:
  """Gives torch XLA's thread count (`set_threads`) and prints the bench's header line."""
  threads = set_threads()
  print(f"# {bench} bench: {threads} threads, jax {jax.__version__}, torch {torch.__version__}, "
        f"{note + ', ' if note else ''}{load_note()}", flush=True)


def torch_device() -> str:
  """'cuda' when JAX runs on a GPU and torch sees one (both sides on the same chip), else 'cpu'."""
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_sync() -> None:
  if torch_device() == "cuda":
    torch.cuda.synchronize()


def build_models(dtype_name: str, seed: int = 0):
  """(jopd cfg, jopd params, transformers model) with identical random weights (std 0.02) in `dtype_name`."""
  jdtype, tdtype = DTYPES[dtype_name]
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**BENCH_MODEL)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.02)
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    cfg, params = hf.load_pretrained(d, dtype=jdtype)
  return cfg, params, model.to(device=torch_device(), dtype=tdtype)


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(1, vocab, size=(batch, length), dtype=np.int64)


def param_bytes(params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  """Best wall time of `repeats` calls (the machine is shared: the minimum is the least disturbed run)."""
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


@contextlib.contextmanager
def compile_times():
  """Collects {jitted function name: XLA compile seconds} for programs compiled inside the block."""
  times: dict[str, float] = {}

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      name = kw.get("fun_name", "?")
      times[name] = times.get(name, 0.0) + duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield times
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def emit(bench: str, ratio: float | None, target: float | None, unit: str, **raw) -> None:
  """One JSON line per result, comparable across runs: bench, ratio, target, unit, then the raw numbers."""
  row = {"bench": bench, "ratio": None if ratio is None else float(f"{ratio:.4g}"), "target": target,
         "unit": unit}
  row.update({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in raw.items()})
  print(json.dumps(row), flush=True)


def load_note() -> str:
  """The 1-minute load average against the core count, so numbers taken under load say so."""
  try:
    load = f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {len(os.sched_getaffinity(0))} usable"
  except OSError:
    load = "load unknown"
  return f"{load}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
