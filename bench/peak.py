"""This machine's measured roofline (run by hand: `python -m bench.peak`): bf16 (fp32-accumulate) and fp32 matmul
FLOP/s and memory read bandwidth, the yardsticks the other benches divide by. Best of N, so load only lowers it.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from bench import common


def _best(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm caches
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


@functools.partial(jax.jit, static_argnames=("reps",))
def _matmuls(a, b, *, reps: int):
  # Several dependent products in one program so dispatch overhead (~50 us) is noise against ~100 ms of work;
  # the scalar feedback keeps XLA from hoisting or fusing the products away.
  def body(_, acc):
    c = jnp.dot(a + acc.astype(a.dtype), b, preferred_element_type=jnp.float32)
    return acc + c[0, 0] * 1e-30
  return jax.lax.fori_loop(0, reps, body, jnp.zeros((), jnp.float32))


def matmul_flops(dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> float:
  """Best FLOP/s over [n, n] x [n, n] products in `dtype` with fp32 accumulation (models/qwen3.py's _dot). Several
  sizes because the fastest depends on the cache and the kernel (AMX tiles on this CPU favour n = 1024)."""
  best = 0.0
  for n in sizes:
    ka, kb = jax.random.split(jax.random.key(n))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    reps = max(1, 4 * 2048**3 // n**3)  # ~69 GFLOP per call (137 at n = 4096)
    s = _best(functools.partial(_matmuls, reps=reps), a, b, repeats=repeats)
    best = max(best, 2 * n**3 * reps / s)
  return best


@jax.jit
def _read(x):
  return jnp.sum(x, dtype=jnp.float32)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
  """Bytes/s of one streaming pass over a fp32 array far larger than the caches (a sum: ~1 add per 4 bytes)."""
  x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
  s = _best(_read, x, repeats=repeats)
  return x.size * 4 / s


def measure(quick: bool = False) -> dict[str, float]:
  """{'bf16_flops', 'fp32_flops', 'read_bytes_s'}; `quick` uses fewer repeats (for benches that need a peak)."""
  r = 2 if quick else 4
  return {"bf16_flops": matmul_flops(jnp.bfloat16, repeats=r), "fp32_flops": matmul_flops(jnp.float32, repeats=r),
          "read_bytes_s": read_bandwidth(repeats=r)}


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  common.set_threads()
  print(f"# peak: jax {jax.__version__} on {jax.devices()[0].device_kind}, {common.load_note()}", flush=True)
  p = measure(args.quick)
  load = common.load_note()
  common.emit("peak_bf16_matmul", p["bf16_flops"] / p["fp32_flops"], None, "x fp32 matmul FLOP/s",
              flops=p["bf16_flops"], gflops=p["bf16_flops"] / 1e9, load=load)
  common.emit("peak_fp32_matmul", 1.0, None, "x fp32 matmul FLOP/s", flops=p["fp32_flops"],
              gflops=p["fp32_flops"] / 1e9, load=load)
  common.emit("peak_read_bandwidth", None, None, "GB/s", bytes_s=p["read_bytes_s"],
              gb_s=p["read_bytes_s"] / 1e9, load=load)


if __name__ == "__main__":
  main()
