"""Demo stage 2: a brief SFT of the small student (2 layers, width 64) on both task kinds, so it knows the format
but not yet the arithmetic; also the off-policy baseline (SFT on teacher-written traces) with overrides.

  python -m jopd.sft --config=configs/demo_student_sft.py:runs/demo   # after `python -m jopd.demo` made data
~40 seconds on 2 CPU cores (300 steps).
"""
from jopd import config, demo_task


def get_config(workdir: str = "runs/demo"):
  paths = demo_task.layout(workdir)
  c = config.sft()
  c.model_name = paths["student_model"]
  c.dataset = paths["student_sft_data"]
  c.log_path = paths["student_sft"]
  c.compilation_cache_dir = paths["cache"]
  c.param_dtype = "float32"
  c.remat = "none"
  c.lora_rank = 0                           # from scratch: every weight must train
  c.learning_rate = 3e-3
  c.lr_schedule = "constant"
  c.warmup_steps = 10
  c.max_grad_norm = 1.0
  c.batch_size = 32
  c.max_length = 96
  c.max_steps = 300
  c.num_epochs = 0
  c.save_every = 0                          # only the final checkpoint
  c.eval_every = 0
  c.max_to_keep = 1
  c.mesh_fsdp = 1
  return c
