"""Routed multi-teacher OPD ("routed MOPD"): one JSONL whose rows carry a route key; each row is scored by
exactly the teacher whose route_value equals it (no blending).

  DISTILLATION_TEACHERS=/ckpts/math-teacher,/ckpts/chat-teacher \
  python -m jopd.train --config=configs/routed.py --config.dataset=prompts.jsonl \
      --config.model_name=/ckpts/Qwen3-8B

Rows: {"messages": [...], "teacher": "<route value>", "teacher_messages": [...optional privileged prompt...]}.
Teachers come from DISTILLATION_TEACHERS (comma-separated model paths or names; each its own route value) and
the route key from DISTILLATION_TEACHER_ROUTE_KEY when set (legacy OPD_TEACHERS / OPD_TEACHER_ROUTE_KEY), else
from --config.teachers / --config.route_key.
"""
from jopd import config, teachers


def get_config():
  c = config.opd()
  c.dataset = "prompts.jsonl"
  c.teacher_model = ""
  c.learning_rate = 1e-4
  c.lora_rank = 8
  c.groups_per_batch = 2
  c.group_size = 1
  c.teachers = [{"name": "math-teacher", "model_path": "Qwen/Qwen3-32B", "route_value": "math-teacher"},
                {"name": "arithmetic-teacher", "model_path": "Qwen/Qwen3-32B", "route_value": "arithmetic-teacher"}]
  env = teachers.teachers_from_env()
  if env.teachers is not None:
    c.teachers = env.teachers
  if env.route_key is not None:
    c.route_key = env.route_key
  return c
