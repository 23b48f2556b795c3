"""A tiny SFT run for tests and smoke checks on CPU (model and data made by the caller).

  python -m jopd.sft --config=configs/tiny_sft.py --config.model_name=DIR --config.dataset=chats.jsonl \
      --config.log_path=/tmp/sft
"""
from jopd import config


def get_config():
  c = config.sft()
  c.param_dtype = "float32"
  c.remat = "none"
  c.lora_rank = 4
  c.lora_alpha = 8.0
  c.learning_rate = 1e-2
  c.lr_schedule = "constant"
  c.batch_size = 4
  c.max_length = 64
  c.max_steps = 3
  c.num_epochs = 0
  c.save_every = 3
  c.eval_every = 0
  return c
