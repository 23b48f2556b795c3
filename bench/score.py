"""Scoring bench (run by hand: `python -m bench.score`): jopd `token_logprobs` vs a transformers forward +
log_softmax + gather on the bench model, 16 x 512 tokens (1 context token + 511 scored), fp32 and bf16.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench import common
from jopd import scoring

TARGETS = {"bf16": 1.9}  # issue 9: jopd / transformers scored tokens/s


def run_jopd(cfg, params, tokens: np.ndarray, repeats: int, chunk_size: int | None):
  contexts = [[int(t[0])] for t in tokens]
  conts = [list(map(int, t[1:])) for t in tokens]
  call = lambda: scoring.token_logprobs(cfg, params, contexts, conts, chunk_size=chunk_size)
  with common.compile_times() as compiled:
    t = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - t
  before = scoring.compile_count()
  steady = common.best_time(call, repeats)
  assert scoring.compile_count() == before, "a repeat call compiled again"
  return np.stack(first), steady, first_s, compiled


def run_hf(model, tokens: np.ndarray, repeats: int):
  ids = torch.tensor(tokens, device=model.device)

  def call():
    logits = model(ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None])[..., 0]

  with torch.inference_mode():
    call()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
      common.torch_sync()
      t = time.perf_counter()
      out = call()
      common.torch_sync()
      best = min(best, time.perf_counter() - t)
  return out.cpu().numpy(), best


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--dtypes", default="fp32,bf16")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--chunk_size", type=int, default=0, help="positions per vocab chunk; 0 = automatic")
  args = ap.parse_args()
  common.start("score")
  for dtype in args.dtypes.split(","):
    cfg, params, model = common.build_models(dtype)
    tokens = common.random_prompts(args.batch, args.length, cfg.vocab_size, seed=1)
    j_lp, j_s, j_first_s, compiled = run_jopd(cfg, params, tokens, args.repeats, args.chunk_size or None)
    h_lp, h_s = run_hf(model, tokens, args.repeats)
    n = args.batch * (args.length - 1)
    j_tps, h_tps = n / j_s, n / h_s
    max_diff = float(np.abs(j_lp - h_lp).max())
    print(f"{dtype} {args.batch}x{args.length}: jopd {j_tps:8.0f} tok/s  transformers {h_tps:8.0f} tok/s  "
          f"ratio {j_tps / h_tps:5.2f}  compile {sum(compiled.values()):.2f}s  max |dlogp| {max_diff:.2e}",
          flush=True)
    common.emit(f"score_{dtype}_{args.batch}x{args.length}", j_tps / h_tps, TARGETS.get(dtype),
                "x transformers forward+log_softmax tok/s", jopd_tok_s=j_tps, hf_tok_s=h_tps, jopd_steady_s=j_s,
                hf_s=h_s, jopd_first_call_s=j_first_s, compile_s={k: round(v, 3) for k, v in compiled.items()},
                max_abs_logprob_diff=max_diff, dtype=dtype, load=common.load_note())


if __name__ == "__main__":
  main()
