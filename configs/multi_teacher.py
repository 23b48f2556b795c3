"""Per-dataset multi-teacher OPD: each step takes groups_per_batch prompts from DeepMath (scored by its
teacher) and from Tulu3 (scored by its own), concatenated into one batch and one update.

  python -m jopd.train --config=configs/multi_teacher.py --config.model_name=/ckpts/Qwen3-8B-Base

Reproduces `on_policy_multi_teacher learning_rate=1e-4 deepmath_groups_per_batch=256
tulu3_groups_per_batch=256 lora_rank=128`. Override a teacher with e.g.
`--config.datasets='[{"dataset": "deepmath", "groups_per_batch": 256, "teacher": "/ckpts/Qwen3-32B"}, ...]'`.
"""
from jopd import config


def get_config():
  c = config.opd()
  c.dataset = ""
  c.teacher_model = ""
  c.learning_rate = 1e-4
  c.lora_rank = 128
  c.datasets = [
      {"dataset": "deepmath", "groups_per_batch": 256, "teacher": {"name": "deepmath", "model_path": "Qwen/Qwen3-8B"}},
      {"dataset": "tulu3", "groups_per_batch": 256, "teacher": {"name": "tulu3", "model_path": "Qwen/Qwen3-8B"}},
  ]
  return c
