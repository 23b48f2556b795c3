"""Demo stage 4: routed multi-teacher OPD. One prompt file mixes both task kinds; each row's `teacher` key sends
it to the addition or the word-problem teacher (both SFT'd in stage 1), and one student learns both.

  python -m jopd.train --config=configs/demo_routed.py:runs/demo   # after the demo's SFT stages
~1.5 minutes on 2 CPU cores (100 steps).
"""
from jopd import demo_task
from configs import demo_opd


def get_config(workdir: str = "runs/demo"):
  paths = demo_task.layout(workdir)
  c = demo_opd.get_config(workdir)
  c.teacher_model = ""
  c.teacher_checkpoint = ""
  c.teachers = [{"name": kind, "model_path": paths["teacher_model"], "route_value": kind,
                 "checkpoint_path": f"{paths[f'teacher_{kind}']}/checkpoints"} for kind in demo_task.KINDS]
  c.route_key = "teacher"
  c.dataset = paths["routed_prompts"]
  c.eval_dataset = paths["routed_eval"]
  c.log_path = paths["routed"]
  return c
