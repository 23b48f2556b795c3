"""Train-step bench (run by hand: `python -m bench.train_step`): the LoRA importance-sampling update of
jopd.update.train_step with jopd.train.opd_loss on the bench model, 16 x 512 tokens, bf16 frozen weights, for each
remat policy; achieved model FLOP/s against this machine's bf16 peak (bench.peak, same run), XLA's peak memory
against jopd.memory's prediction, and a torch forward + backward + Adam step of the same loss for the ratio.

FLOPs counted (model FLOPs, recomputation under remat not counted; `train_flops`): per token 2 * N_frozen
forward + 2 * N_frozen backward (input gradients only: frozen weights get no weight gradient), where N_frozen
counts every matmul weight the token passes through (the tied embedding once, as the LM head); 6 * N_lora for
the adapters (forward, input and weight gradients); attention 3 x 4 * T * H * Dh per token per layer (scores and
values over all T keys, as computed: the causal mask does not skip work).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common, peak
from jopd import config as config_lib, memory, train, update
from models import lora, qwen3

LORA_RANK = 32       # r / hidden = 1/16, in the range of rank 128-256 on a 4096-wide model
TARGET = 0.40        # issue 9: achieved FLOP/s >= 40% of the measured bf16 peak
REMATS = ("none", "dots", "full")


def train_flops(cfg: qwen3.Qwen3Config, lcfg: lora.LoraConfig, batch: int, length: int) -> float:
  """Model FLOPs of one LoRA update (see the module docstring)."""
  frozen = sum(math.prod(d.shape) for p, d in qwen3.param_decls(cfg).items() if "norm" not in p)
  lora_n = sum(math.prod(d.shape) for d in lora.adapter_decls(cfg, lcfg).values())
  tokens = batch * length
  attention = 3 * 4 * length * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return tokens * (4 * frozen + 6 * lora_n + attention)


def make_batch(cfg, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A trainer batch (jopd.train.build_batch's keys): 64 prompt tokens then completion tokens to the end."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, (batch, length), dtype=np.int32)
  loss_mask = np.zeros((batch, length), bool)
  loss_mask[:, 63:length - 1] = True
  return {"tokens": tokens, "attention_mask": np.ones((batch, length), bool),
          "targets": np.pad(tokens[:, 1:], ((0, 0), (0, 1))), "loss_mask": loss_mask,
          "sampling_logprobs": np.where(loss_mask, -10.5, 0.0).astype(np.float32),
          "advantages": np.where(loss_mask, rng.normal(0, 0.1, (batch, length)), 0.0).astype(np.float32)}


def setup(cfg, params, batch: int, length: int, rank: int = LORA_RANK):
  """(args, kwargs) of update.train_step for the bench: fresh fp32 adapters and Adam state, the OPD loss."""
  lcfg = lora.LoraConfig(rank=rank)
  adapters = lora.init_adapters(cfg, lcfg, jax.random.key(1))
  # B = 0 would make the backward through B trivially sparse for nobody; give it values as after some steps.
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 1e-3 if p[-1].key == "b" else x, adapters)
  c = config_lib.opd()
  optimizer = update.make_optimizer(c, 1000)
  opt_state = optimizer.init(adapters)
  loss_fn = functools.partial(train.opd_loss, cfg, True, lcfg.scale, 1.0, float(c.ratio_log_cap), "sum", 128)
  data = {k: jnp.asarray(v) for k, v in make_batch(cfg, batch, length).items()}
  return lcfg, (adapters, opt_state, params, data), dict(loss_fn=loss_fn, optimizer=optimizer)


def run_jopd(cfg, params, batch: int, length: int, steps: int):
  lcfg, args, kw = setup(cfg, params, batch, length)
  t = time.perf_counter()
  lowered = update.train_step.lower(*args, **kw)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = (t1 - t, time.perf_counter() - t1)   # (trace + lower, XLA compile)
  trainable, opt_state, frozen, data = args
  best, metrics = float("inf"), None
  for _ in range(steps):
    t = time.perf_counter()
    trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, data)
    jax.block_until_ready(metrics)
    best = min(best, time.perf_counter() - t)
  assert np.isfinite(float(metrics["loss"])), metrics
  return lcfg, best, compile_s, compiled


# --------------------------------------------------------------------------------------------------------------
# The torch reference: the same loss through the transformers model with manual (PEFT-free) LoRA.

class _LoraLinear(torch.nn.Module):
  """y = W x + (x A) B * scale with fp32 adapters, as models/qwen3.py applies them."""

  def __init__(self, base: torch.nn.Linear, rank: int, scale: float):
    super().__init__()
    self.base, self.scale = base, scale
    self.a = torch.nn.Parameter(torch.randn(base.in_features, rank) / math.sqrt(base.in_features))
    self.b = torch.nn.Parameter(torch.full((rank, base.out_features), 1e-3))

  def forward(self, x):
    low = (x.float() @ self.a) @ self.b
    return self.base(x) + (low * self.scale).to(x.dtype)


def run_torch(model, data: dict[str, np.ndarray], rank: int, scale: float, steps: int) -> float:
  targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
  for p in model.parameters():
    p.requires_grad_(False)
  for name, module in list(model.named_modules()):
    for child_name, child in list(module.named_children()):
      if child_name in targets and isinstance(child, torch.nn.Linear):
        setattr(module, child_name, _LoraLinear(child, rank, scale))
  adapters = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(adapters, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in data.items()}
  mask = t["loss_mask"].float()

  def step():
    logits = model(t["tokens"].long(), attention_mask=t["attention_mask"].long()).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, t["targets"].long()[..., None])[..., 0]
    log_ratio = (logp - t["sampling_logprobs"]) * mask
    loss = -(torch.exp(log_ratio.clamp(-20, 20)) * t["advantages"] * mask).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  model.train(False)
  step()  # warm-up
  return common.best_time(step, steps)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--remats", default=",".join(REMATS))
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--torch_steps", type=int, default=2)
  ap.add_argument("--no_torch", action="store_true")
  args = ap.parse_args()
  common.start("train_step")
  peak_flops = peak.matmul_flops(jnp.bfloat16, repeats=2)
  print(f"# measured bf16 matmul peak {peak_flops / 1e9:.0f} GFLOP/s", flush=True)
  cfg, params, model = common.build_models("bf16")
  torch_s = None
  if not args.no_torch:
    data = make_batch(cfg, args.batch, args.length)
    torch_s = run_torch(model, data, LORA_RANK, lora.LoraConfig(rank=LORA_RANK).scale, args.torch_steps)
  del model
  for remat in args.remats.split(","):
    rcfg = dataclasses.replace(cfg, remat=remat)
    lcfg, step_s, (lower_s, compile_s), compiled = run_jopd(rcfg, params, args.batch, args.length, args.steps)
    flops = train_flops(rcfg, lcfg, args.batch, args.length)
    achieved = flops / step_s
    mem = memory.measured(compiled)
    pred = memory.train_step(rcfg, lcfg, memory.TrainShape(args.batch, args.length), jnp.bfloat16, cpu=True)
    xla_flops = compiled.cost_analysis().get("flops", float("nan"))
    print(f"remat={remat:5s}: step {step_s:.3f}s  {achieved / 1e9:6.1f} GFLOP/s = {achieved / peak_flops:.1%} of "
          f"peak  compile {lower_s:.2f}s + {compile_s:.2f}s  peak memory XLA {mem['peak'] / 2**20:.0f} MiB, predicted "
          f"{pred['peak'] / 2**20:.0f} MiB" + (f"  torch {torch_s:.3f}s (x{torch_s / step_s:.2f})" if torch_s
                                                else ""), flush=True)
    load = common.load_note()
    common.emit(f"train_step_bf16_remat_{remat}", achieved / peak_flops, TARGET, "fraction of bf16 peak FLOP/s",
                step_s=step_s, compile_s=lower_s + compile_s, lower_s=lower_s, model_gflop=flops / 1e9, xla_gflop=xla_flops / 1e9,
                achieved_gflops=achieved / 1e9, peak_gflops=peak_flops / 1e9,
                torch_step_s=torch_s, speedup_vs_torch=torch_s / step_s if torch_s else None,
                batch=args.batch, length=args.length, lora_rank=LORA_RANK, load=load)
    common.emit(f"memory_train_step_bf16_remat_{remat}", pred["peak"] / mem["peak"], 1.0,
                "predicted / XLA peak bytes (within 0.8-1.2)", predicted_mib=pred["peak"] / 2**20,
                measured_mib=mem["peak"] / 2**20, measured=mem, predicted={k: int(v) for k, v in pred.items()})


if __name__ == "__main__":
  main()
