"""On-policy distillation on Tulu3 prompts (the reference's personalization recipe).

  python -m jopd.train --config=configs/tulu3.py \
      --config.model_name=/ckpts/Qwen3-8B-Base --config.load_checkpoint_path=/ckpts/my-sft \
      --config.teacher_model=/ckpts/Qwen3-8B

Reproduces `on_policy_distillation dataset=tulu3 learning_rate=1e-4 groups_per_batch=64 lora_rank=128`; the
reference saw IF-eval recover within ~100 steps. Bring your own SFT initialisation (load_checkpoint_path).
"""
from jopd import config


def get_config():
  c = config.opd()
  c.dataset = "tulu3"
  c.teacher_model = "Qwen/Qwen3-8B"
  c.learning_rate = 1e-4
  c.groups_per_batch = 64
  c.lora_rank = 128
  return c
