"""A tiny OPD run for tests and smoke checks on CPU (models and data made by the caller).

  python -m jopd.train --config=configs/tiny_opd.py --config.model_name=DIR --config.teacher_model=DIR \
      --config.dataset=rows.jsonl --config.log_path=/tmp/run
"""
from jopd import config


def get_config():
  c = config.opd()
  c.param_dtype = "float32"
  c.remat = "none"
  c.lora_rank = 4
  c.lora_alpha = 8.0
  c.learning_rate = 1e-2
  c.groups_per_batch = 2
  c.group_size = 2
  c.max_tokens = 8
  c.max_prompt_tokens = 64
  c.max_steps = 3
  c.num_epochs = 0                          # repeat the data until max_steps
  c.save_every = 3
  c.eval_every = 0
  c.mesh_fsdp = -1
  return c
