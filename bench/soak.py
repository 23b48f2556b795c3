"""Soak bench (by hand: `python -m bench.soak [--steps=300]`, a few minutes on a laptop CPU): a demo-sized OPD run
whose resident memory must not grow: RSS after the last step at most 5% above RSS after step 50 (issue 10);
exits 1 when it grew more.

The run is `jopd.train.run` in this process on configs/demo_opd.py (the demo's OPD stage) with fresh random
student and teacher and demo prompts. RSS (psutil) is read right after each step's metrics are written; a point
is the median of the 10 steps ending there. Prints a JSON line every 25 steps (with the number of live jax
arrays, which must not grow) and a final line with the ratio and the fitted slope.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time

import jax
import numpy as np
import psutil

from jopd import demo_task
from jopd import metrics as metrics_lib
from jopd import runtime, train
from jopd.data import tokenizer as tokenizer_lib
from models import hf, qwen3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.05  # RSS(last step) / RSS(step 50)
FIRST = 50
WINDOW = 10  # steps whose median RSS stands for one point


def make_world(root: str, rows: int) -> dict[str, str]:
  """A demo-sized student (hidden 64, 2 layers), a perturbed copy as teacher, and `rows` demo prompts."""
  problems = demo_task.problems("add", rows, seed=0, split="train")
  tok = tokenizer_lib.train_tokenizer(demo_task.corpus([problems]), vocab_size=512)
  cfg = qwen3.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0)
  student = qwen3.init_params(cfg, jax.random.key(0), std=0.3)
  noise = qwen3.init_params(cfg, jax.random.key(1), std=0.3)
  teacher = jax.tree.map(lambda s, n: s + 0.3 * n, student, noise)
  out = {}
  for name, params in (("student", student), ("teacher", teacher)):
    path = os.path.join(root, name)
    hf.save_pretrained(path, cfg, params)
    tok.save_pretrained(path)
    out[name] = path
  out["data"] = demo_task.write_jsonl(os.path.join(root, "prompts.jsonl"),
                                      [demo_task.prompt_row(p) for p in problems])
  return out


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("soak_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--every", type=int, default=25, help="sample memory every this many steps")
  parser.add_argument("--save_every", type=int, default=50, help="checkpoints during the soak (0: final only)")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "demo_opd.py"))
  parser.add_argument("--workdir", default="", help="default: a temporary directory")
  args = parser.parse_args()
  if args.steps <= FIRST:
    parser.error(f"--steps={args.steps}: must be > {FIRST}, the first memory sample")
  runtime.setup_logging()

  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    world = make_world(root, rows=256)
    c = load_config(args.config)
    c.model_name, c.teacher_model, c.dataset = world["student"], world["teacher"], world["data"]
    c.teacher_checkpoint = c.load_checkpoint_path = ""
    c.max_steps, c.save_every, c.eval_every = args.steps, args.save_every, 0
    c.log_path = os.path.join(root, "run")

    process = psutil.Process()
    rss: dict[int, float] = {}
    write = metrics_lib.MetricsWriter.write
    started = time.perf_counter()

    def write_and_sample(self, step, metrics):
      write(self, step, metrics)
      rss[step] = process.memory_info().rss / 2**20
      if step % args.every == 0 or step == 1:
        print(json.dumps({"bench": "soak/sample", "step": step, "rss_mb": round(rss[step], 1),
                          f"rss_mb_median{WINDOW}": round(_median(rss, step), 1),
                          "live_arrays": len(jax.live_arrays()),
                          "elapsed_s": round(time.perf_counter() - started, 1)}), flush=True)

    metrics_lib.MetricsWriter.write = write_and_sample
    train.run(c)

  first, last = _median(rss, FIRST), _median(rss, args.steps)
  later = sorted(s for s in rss if s >= FIRST)
  slope = float(np.polyfit(later, [rss[s] for s in later], 1)[0]) * 100
  # A leak is growth: memory that falls after warm-up (allocators returning compile and first-save buffers) passes.
  ok = last / first <= TARGET
  print(json.dumps({"bench": "soak", "ratio": round(last / first, 4), "target": TARGET,
                    "unit": f"rss(step {args.steps}) / rss(step {FIRST}), medians of {WINDOW} steps",
                    "config": os.path.relpath(args.config, REPO), "steps": args.steps,
                    f"rss_mb_step{FIRST}": round(first, 1), f"rss_mb_step{args.steps}": round(last, 1),
                    "rss_mb_min": round(min(rss[s] for s in later), 1),
                    "rss_mb_max": round(max(rss[s] for s in later), 1),
                    "slope_mb_per_100_steps": round(slope, 2), "ok": ok}), flush=True)
  if not ok:
    raise SystemExit(f"soak: RSS at step {args.steps} is {last / first:.3f}x step {FIRST}'s; expected within "
                     f"at most {TARGET:.2f}x")


def _median(rss: dict[int, float], step: int) -> float:
  """RSS around `step`: the median of the WINDOW steps ending there (single readings swing by ~15% as XLA's
  and glibc's allocators take and return memory)."""
  return float(np.median([rss[s] for s in range(step - WINDOW + 1, step + 1) if s in rss]))


if __name__ == "__main__":
  main()
