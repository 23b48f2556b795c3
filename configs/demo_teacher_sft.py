"""Demo stage 1: SFT of a tiny Qwen3 teacher (3 layers, width 96) on one task kind's worked solutions.

  python -m jopd.sft --config=configs/demo_teacher_sft.py:runs/demo,add   # after `python -m jopd.demo` made data
The argument is `<demo workdir>,<task kind>` (add | word); ~1 minute on 2 CPU cores (400 steps).
"""
from jopd import config, demo_task


def get_config(arg: str = "runs/demo,add"):
  workdir, kind = arg.split(",")
  paths = demo_task.layout(workdir)
  c = config.sft()
  c.model_name = paths["teacher_model"]
  c.dataset = paths[f"{kind}_sft_data"]
  c.log_path = paths[f"teacher_{kind}"]
  c.compilation_cache_dir = paths["cache"]  # shared by every stage: same shapes compile once
  c.param_dtype = "float32"                 # tiny models on CPU: fp32 costs nothing and needs no care
  c.remat = "none"
  c.lora_rank = 0                           # a from-scratch model: every weight must train
  c.learning_rate = 5e-3
  c.lr_schedule = "cosine"
  c.warmup_steps = 20
  c.max_grad_norm = 1.0
  c.batch_size = 32                          # more, smaller steps learn faster per token here
  c.max_length = 96
  c.max_steps = 400
  c.num_epochs = 0                          # repeat the data until max_steps
  c.save_every = 0                          # only the final checkpoint
  c.eval_every = 0
  c.max_to_keep = 1
  c.mesh_fsdp = 1
  return c
