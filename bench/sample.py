"""Sampling bench (run by hand: `python -m bench.sample`): jopd's sampler vs transformers `generate` on the
bench model, greedy, 64-token prompts, 256 new tokens, no early stop, batch 1 and 16, fp32 and bf16.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch

from bench import common
from jopd import sampler

# Issue 9 targets (jopd / transformers tokens/s), bf16 only.
TARGETS = {("bf16", 1): 2.7, ("bf16", 16): 3.4}


def run_jopd(cfg, params, prompts: np.ndarray, new_tokens: int, repeats: int):
  rows = [list(map(int, p)) for p in prompts]
  call = lambda: sampler.sample(cfg, params, rows, max_new_tokens=new_tokens, temperature=0.0,
                                stop_token_ids=[], rng=jax.random.key(0))
  with common.compile_times() as compiled:
    t = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - t
  assert all(len(x) == new_tokens for x in first.tokens), "jopd stopped early"
  before = sampler.compile_count()
  steady = common.best_time(call, repeats)
  assert sampler.compile_count() == before, "a repeat call compiled again"
  return first.tokens, steady, first_s, compiled


def run_hf(model, prompts: np.ndarray, new_tokens: int, repeats: int):
  ids = torch.tensor(prompts, device=model.device)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
  with torch.inference_mode():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    out = None
    best = float("inf")
    for _ in range(repeats):
      common.torch_sync()
      t = time.perf_counter()
      out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
      common.torch_sync()
      best = min(best, time.perf_counter() - t)
  assert out.shape[1] == prompts.shape[1] + new_tokens, "transformers stopped early"
  return out[:, prompts.shape[1]:].cpu().numpy(), best


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--dtypes", default="fp32,bf16")
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--hf_repeats", type=int, default=1)
  args = ap.parse_args()
  common.start("sample")
  for dtype in args.dtypes.split(","):
    cfg, params, model = common.build_models(dtype)
    weight_bytes = common.param_bytes(params)
    for batch in map(int, args.batches.split(",")):
      prompts = common.random_prompts(batch, args.prompt_len, cfg.vocab_size, seed=batch)
      j_tokens, j_s, j_first_s, compiled = run_jopd(cfg, params, prompts, args.new_tokens, args.repeats)
      h_tokens, h_s = run_hf(model, prompts, args.new_tokens, args.hf_repeats)
      n = batch * args.new_tokens
      j_tps, h_tps = n / j_s, n / h_s
      # Greedy agreement of the first 16 tokens (bf16 rounding differs between the two, so not a hard check).
      agree = float(np.mean(np.stack(j_tokens)[:, :16] == h_tokens[:, :16]))
      print(f"{dtype} batch {batch:2d}: jopd {j_tps:8.1f} tok/s  transformers {h_tps:8.1f} tok/s  "
            f"ratio {j_tps / h_tps:5.2f}  compile {sum(compiled.values()):.2f}s "
            f"({', '.join(f'{k} {v:.2f}s' for k, v in compiled.items())})", flush=True)
      common.emit(f"sample_{dtype}_b{batch}", j_tps / h_tps, TARGETS.get((dtype, batch)),
                  "x transformers generate tok/s", jopd_tok_s=j_tps, hf_tok_s=h_tps, jopd_steady_s=j_s,
                  hf_s=h_s, jopd_first_call_s=j_first_s, compile_s={k: round(v, 3) for k, v in compiled.items()},
                  weight_stream_gb_s=weight_bytes * args.new_tokens / j_s / 1e9, greedy_agree_16=agree,
                  batch=batch, dtype=dtype, new_tokens=args.new_tokens, load=common.load_note())


if __name__ == "__main__":
  main()
