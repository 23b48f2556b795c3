"""On-policy distillation on DeepMath-103K (the reference's reasoning recipe, step 2 after OpenThoughts3 SFT).

  python -m jopd.train --config=configs/deepmath.py \
      --config.model_name=/ckpts/Qwen3-8B-Base --config.teacher_model=/ckpts/Qwen3-32B \
      --config.load_checkpoint_path=gs://bucket/sft/checkpoints --config.log_path=gs://bucket/opd

Reproduces `tinker_cookbook.recipes.distillation.on_policy_distillation dataset=deepmath learning_rate=1e-4
groups_per_batch=512 lora_rank=128`: 4 samples per prompt, 4096 new tokens, temperature 1, reverse-KL
advantages (kl_penalty_coef 1, no discount), importance-sampling loss summed over tokens. The reference reports
AIME'24 ~65% after ~100 steps from its SFT checkpoint. Use 5e-5 with full fine-tuning (lora_rank=0).
Offline: `--config.data_files=/data/deepmath/*.parquet`.
"""
from jopd import config


def get_config():
  c = config.opd()
  c.dataset = "deepmath"
  c.teacher_model = "Qwen/Qwen3-8B"
  c.learning_rate = 1e-4
  c.groups_per_batch = 512
  c.group_size = 4
  c.lora_rank = 128
  c.max_tokens = 4096
  return c
