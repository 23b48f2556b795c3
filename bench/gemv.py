"""Small-row dot kernels (run by hand: `python -m bench.gemv`): the rate at which XLA:CPU (jopd's dot path,
models/qwen3.py's einsum_f32) and torch (F.linear, oneDNN) stream a bf16 weight when only 1-16 rows multiply
it — the decode step's dots — against this machine's read bandwidth (bench.peak, same run).

This is the ceiling of the batch-1 sampling roofline: a decode step reads every weight once, so the sampler can
stream weights no faster than these kernels do. Each shape runs as a stack of distinct weights (more bytes than
the caches hold) in one jitted loop (XLA) or one Python loop (torch), so per-call dispatch is small against the
products.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import torch

from bench import common, peak
from models import qwen3

# [K, N] of the bench model's decode dots (q / o, k / v, gate / up, down, the tied head) and stack depth (>= ~36 MB).
SHAPES = {"q": (512, 512, 96), "kv": (512, 256, 192), "gate": (512, 1536, 24), "down": (1536, 512, 24),
          "head": (512, 32000, 2)}


@functools.partial(jax.jit, static_argnames=("iters",))
def _xla_loop(x_mk, w_lkn, *, iters: int):
  # A decode-like loop: each product's full output feeds a scalar into the next input, so XLA can neither
  # hoist, merge nor trim any product. (Independent products of one input in one program are merged and
  # upcast to fp32 by XLA:CPU, a different and slower path than the sampler's.)
  def body(_, s_m1):
    for l in range(w_lkn.shape[0]):
      y_mn = qwen3.einsum_f32("mk,kn->mn", x_mk + (s_m1 * 0).astype(x_mk.dtype), w_lkn[l])
      s_m1 = s_m1 + jnp.sum(y_mn, axis=1, keepdims=True) * 1e-9
    return s_m1
  return jax.lax.fori_loop(0, iters, body, jnp.zeros((x_mk.shape[0], 1), jnp.float32))


def xla_seconds(rows: int, k: int, n: int, layers: int, iters: int, repeats: int) -> float:
  """Seconds per [rows, k] x [k, n] bf16 dot in XLA (with the small elementwise ops that chain it)."""
  w = jax.random.normal(jax.random.key(0), (layers, k, n), jnp.float32).astype(jnp.bfloat16) * 0.02
  x = jnp.ones((rows, k), jnp.bfloat16)
  jax.block_until_ready(_xla_loop(x, w, iters=iters))
  return common.best_time(lambda: _xla_loop(x, w, iters=iters), repeats) / (iters * layers)


def torch_seconds(rows: int, k: int, n: int, layers: int, iters: int, repeats: int) -> float:
  """Seconds per [rows, k] x [k, n] bf16 product in torch (weights stored [n, k], as nn.Linear holds them)."""
  w = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
  x = torch.ones(rows, k, dtype=torch.bfloat16)

  def run():
    for _ in range(iters):
      for wl in w:
        torch.nn.functional.linear(x, wl)

  with torch.inference_mode():
    run()
    best = common.best_time(run, repeats)
  return best / (iters * layers)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--rows", default="1,2,16",
                  help="rows per product (the sampler runs batch 1 as 2 rows in bf16 on CPU)")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  common.start("gemv", f"native bf16 dots: {not qwen3.upcast_dots()}")
  # XLA:CPU unrolls loops of a few trips, and the unrolled products then take a slower path (at 4 trips,
  # 2-2.5x slower); the sampler's decode loop has 256.
  iters = max(16, args.iters)
  bandwidth = peak.read_bandwidth(repeats=3)
  print(f"# measured read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
  for rows in (int(r) for r in args.rows.split(",")):
    for name, (k, n, layers) in SHAPES.items():
      xs = xla_seconds(rows, k, n, layers, iters, args.repeats)
      ts = torch_seconds(rows, k, n, layers, iters, args.repeats)
      xla_bw, torch_bw = k * n * 2 / xs, k * n * 2 / ts
      print(f"rows {rows:2d} {name:5s} [{k}, {n}] bf16: XLA {xs * 1e6:7.1f} us = {xla_bw / 1e9:5.1f} GB/s "
            f"({xla_bw / bandwidth:.2f} of read bandwidth), torch {ts * 1e6:7.1f} us = {torch_bw / 1e9:5.1f} GB/s "
            f"({torch_bw / bandwidth:.2f})", flush=True)
      common.emit(f"gemv_{name}_b{rows}_bf16", xla_bw / bandwidth, None, "XLA weight stream / read bandwidth",
                  xla_gb_s=xla_bw / 1e9, torch_gb_s=torch_bw / 1e9, xla_over_torch=ts / xs,
                  read_gb_s=bandwidth / 1e9, rows=rows, k=k, n=n)


if __name__ == "__main__":
  main()
