"""Off-policy SFT on OpenThoughts3 reasoning traces (the reference's reasoning recipe, step 1).

  python -m jopd.sft --config=configs/openthoughts3_sft.py --config.model_name=/ckpts/Qwen3-8B-Base \
      --config.log_path=gs://bucket/sft
  # then: python -m jopd.train --config=configs/deepmath.py --config.load_checkpoint_path=gs://bucket/sft/checkpoints

Reproduces `tinker_cookbook.recipes.distillation.off_policy_reasoning learning_rate=1e-3 batch_size=128
lora_rank=128` (linear LR decay); the reference reports AIME'24 ~55% after 3000 steps. Use 1e-4 with full
fine-tuning (lora_rank=0). Offline: `--config.data_files=/data/openthoughts3/*.parquet`.
"""
from jopd import config


def get_config():
  c = config.sft()
  c.dataset = "openthoughts3"
  c.learning_rate = 1e-3
  c.lr_schedule = "linear"
  c.batch_size = 128
  c.lora_rank = 128
  c.max_length = 16384
  c.max_steps = 3000
  return c
