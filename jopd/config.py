"""Default run configs shared by `configs/*.py` (ml_collections ConfigDicts, overridable with --config.x=y).

Field names follow the reference recipes (tinker cookbook) where they exist; README.md has the full table.
"""
from __future__ import annotations

import ml_collections


def common() -> ml_collections.ConfigDict:
  """Fields shared by OPD (`jopd.train`) and SFT (`jopd.sft`)."""
  c = ml_collections.ConfigDict()
  c.model_name = "Qwen/Qwen3-8B-Base"       # student: local HF checkpoint dir, or hub name (cache / network)
  c.tokenizer_path = ""                     # defaults to model_name
  c.load_checkpoint_path = ""               # weights only (a jopd checkpoint dir or a PEFT adapter dir)
  c.dataset = "deepmath"                    # builder name or path to a JSONL file of the row contract
  c.data_files = ""                         # local copies of a builder's hub dataset (JSONL or parquet)
  c.split = "train"                         # hub datasets only; local files are read whole
  c.max_rows = 0                            # 0: all rows
  c.strict = False                          # raise on the first bad row instead of counting a skip
  c.seed = 0                                # data order, adapter init, sampling
  c.num_epochs = 1                          # 0: repeat the data until max_steps

  c.lora_rank = 128                         # 0: full fine-tuning
  c.lora_alpha = 32.0                       # LoRA scale = alpha / rank
  c.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")  # + "lm_head" to adapt the output layer
  c.param_dtype = "bfloat16"                # frozen base weights; LoRA and optimizer state stay fp32
  c.remat = "full"                          # jax.checkpoint policy of the layer scan: none | full | dots

  c.learning_rate = 1e-4                    # reference: 1e-4 LoRA / 5e-5 full for OPD
  c.lr_schedule = "constant"                # constant | linear | cosine
  c.warmup_steps = 0                        # linear warmup from 0
  c.max_grad_norm = 0.0                     # 0: no clipping
  c.adam_b1 = 0.9                           # Adam(b1, b2, eps) as in the reference
  c.adam_b2 = 0.95
  c.adam_eps = 1e-8
  c.micro_batch_size = 0                    # 0: whole (sub)batch at once; else gradient accumulation

  c.max_steps = 0                           # 0: until the data ends
  c.eval_every = 20                         # steps between evals (0: never)
  c.save_every = 20                         # steps between checkpoints (0: only at the end)
  c.max_to_keep = 3                         # checkpoints kept
  c.log_path = ""                           # default: runs/<config name>-<time>
  c.wandb_project = ""                      # W&B logging when set (pip install 'jopd[wandb]')
  c.compilation_cache_dir = ""              # default: <log_path>/xla_cache

  c.mesh_data = 1                           # mesh ('data', 'fsdp', 'tensor') sizes
  c.mesh_fsdp = -1                          # -1: all remaining devices
  c.mesh_tensor = 1                         # heads / MLP hidden / vocab split
  return c


def opd() -> ml_collections.ConfigDict:
  """On-policy distillation defaults (tinker cookbook `on_policy_distillation` CLIConfig)."""
  c = common()
  c.teacher_model = "Qwen/Qwen3-8B"         # single-teacher mode
  c.teacher_checkpoint = ""                 # jopd checkpoint or PEFT adapter applied to the teacher
  c.teacher_tokenizer_path = ""             # defaults to teacher_model
  # Multi-teacher: per-dataset list of {dataset, data_files, teacher: {...}, groups_per_batch} ...
  c.datasets = []                           # per-dataset mode (see comment above)
  # ... or routed: rows carry `route_key`; each teacher {model_path, route_value, checkpoint_path, ...}.
  c.teachers = []                           # routed mode (see comment above)
  c.route_key = "teacher"                   # row key holding the route value

  c.group_size = 4                          # completions sampled per prompt
  c.groups_per_batch = 1024                 # prompts per step
  c.max_tokens = 4096                       # completion length limit
  c.max_prompt_tokens = 1024                # longer prompts are skipped (data/skipped/prompt_too_long)
  c.precompile = False                      # compile every length bucket before step 1 (then no compiles)
  c.temperature = 1.0                       # sampling temperature (the trainer's logprobs use it too)
  c.top_p = 1.0                             # 1: off
  c.top_k = 0                               # 0: off
  c.kl_penalty_coef = 1.0                   # advantage = -coef * (sampling - teacher logprob)
  c.kl_discount_factor = 0.0                # > 0: discounted future KL over completion tokens
  c.num_substeps = 1                        # sequential updates per sampled batch
  c.ratio_log_cap = 20.0                    # |log importance ratio| cap
  c.loss_normalization = "sum"              # sum (reference) | token_mean
  c.eval_dataset = ""                       # JSONL/builder of held-out rows with expected_answer
  c.eval_rows = 0                           # 0: all of eval_dataset
  c.eval_max_tokens = 0                     # 0: max_tokens
  c.max_consecutive_nonfinite = 3           # stop after this many skipped non-finite updates in a row
  return c


def sft() -> ml_collections.ConfigDict:
  """Off-policy SFT defaults (tinker cookbook `off_policy_reasoning`)."""
  c = common()
  c.dataset = "openthoughts3"
  c.learning_rate = 1e-3
  c.lr_schedule = "linear"
  c.batch_size = 128                        # conversations per step, on average (packed into fixed rows)
  c.max_length = 16384                      # tokens per conversation (longer ones truncated)
  c.train_on = "all_assistant"              # all_assistant | last_assistant
  c.reduction = "sum"                       # sum | mean (per example)
  c.eval_dataset = ""                       # held-out conversations for eval NLL
  c.eval_rows = 0                           # 0: all of eval_dataset
  c.save_every = 500
  c.eval_every = 100
  return c
