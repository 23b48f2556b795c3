"""Demo stage 3: on-policy distillation of the weak student from the addition teacher (full fine-tuning).

  python -m jopd.train --config=configs/demo_opd.py:runs/demo   # after the demo's SFT stages
~1 minute on 2 CPU cores (100 steps). configs/demo_routed.py is the two-teacher variant.
"""
from jopd import config, demo_task


def get_config(workdir: str = "runs/demo"):
  paths = demo_task.layout(workdir)
  c = config.opd()
  c.model_name = paths["student_model"]
  c.load_checkpoint_path = f"{paths['student_sft']}/checkpoints"
  c.teacher_model = paths["teacher_model"]
  c.teacher_checkpoint = f"{paths['teacher_add']}/checkpoints"
  c.dataset = paths["opd_prompts"]
  c.eval_dataset = paths["add_eval"]
  c.log_path = paths["opd"]
  c.compilation_cache_dir = paths["cache"]
  c.param_dtype = "float32"
  c.remat = "none"
  # Full fine-tuning: the student has 0.12M weights, so LoRA would save nothing, and at the ranks that matter
  # for 64-wide matrices an adapter is nearly as large as the weights it adapts.
  c.lora_rank = 0
  c.learning_rate = 1e-3                    # 2e-3 already unsettles the student's SFT'd skills
  c.lr_schedule = "cosine"                  # the decay lets the noisy sampled-KL updates settle
  c.warmup_steps = 10
  c.max_grad_norm = 1.0
  c.groups_per_batch = 32                   # 128 samples a step: half as many made progress erratic
  c.group_size = 4
  c.max_tokens = 32
  c.max_prompt_tokens = 64
  c.temperature = 1.0
  c.loss_normalization = "token_mean"       # a step size that does not depend on completion lengths
  c.max_steps = 100
  c.num_epochs = 0
  c.eval_every = 10
  c.save_every = 0
  c.max_to_keep = 1
  c.mesh_fsdp = 1
  return c
