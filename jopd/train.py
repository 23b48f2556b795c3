"""On-policy distillation: `python -m jopd.train --config=configs/deepmath.py [--config.field=value ...]`.

The host loop owns the order sample -> route -> teacher score -> advantages -> update; each stage is a jitted
function elsewhere (jopd.sampler, jopd.scoring, jopd.update) taking params as arguments.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from tqdm import tqdm

from jopd import buckets, checkpoint, cli, distributed, losses, runtime, sampler, scoring, update
from jopd import teachers as teachers_lib
from jopd import eval as eval_lib
from jopd import mesh as mesh_lib
from jopd import metrics as metrics_lib
from jopd.data import pipeline as data_pipeline
from jopd.data.rows import SkipCounter
from models import lora, qwen3

log = logging.getLogger("jopd")

# Exit status after a SIGTERM (preemption) was answered with a checkpoint; launchers restart on it.
PREEMPTED_EXIT_CODE = 42

CONFIG_FLAG = cli.CONFIG_FLAG


# ============================================================================================ teachers

class Teacher:
  """A frozen teacher: shared base params (one copy per model_path) plus its optional adapter."""

  def __init__(self, spec: teachers_lib.TeacherConfig, model: runtime.Model, adapters=None, lora_scale=1.0,
               params=None):
    self.spec, self.model = spec, model
    self.params = model.params if params is None else params
    self.adapters, self.lora_scale = adapters, lora_scale


def load_teachers(c, specs, student: runtime.Model, mesh) -> dict[str, Teacher]:
  bases: dict[str, runtime.Model] = {}
  out = {}
  for spec in teachers_lib.all_teachers(specs):
    if spec.model_path not in bases:
      bases[spec.model_path] = runtime.load_model(spec.model_path, c, mesh, what=f"teacher {spec.name} model_path")
    base = bases[spec.model_path]
    tokenizer = base.tokenizer
    if spec.tokenizer_path and spec.tokenizer_path != spec.model_path:
      tokenizer = runtime.load_tokenizer(runtime.resolve_model_path(spec.tokenizer_path, "teacher tokenizer_path"))
    model = runtime.Model(base.cfg, base.params, tokenizer, base.path)
    # Base students and instruct teachers differ in eos (<|endoftext|> vs <|im_end|>); ids are still compared
    # in full and both end tokens stop sampling (see stop_token_ids).
    teachers_lib.check_tokenizers(student.tokenizer, tokenizer, spec.name, ignore_roles=("eos",))
    if student.cfg.vocab_size != model.cfg.vocab_size:
      raise ValueError(f"teacher {spec.name!r}: vocab_size {model.cfg.vocab_size} != student's "
                       f"{student.cfg.vocab_size}; the teacher scores the student's token ids")
    out[spec.name] = _with_checkpoint(spec, model, mesh)
  return out


def _with_checkpoint(spec, model: runtime.Model, mesh) -> Teacher:
  if not spec.checkpoint_path:
    return Teacher(spec, model)
  if os.path.exists(os.path.join(spec.checkpoint_path, "adapter_config.json")):
    from jopd import export
    adapters, lcfg = export.import_peft(spec.checkpoint_path, model.cfg)
    return Teacher(spec, model, _replicate(adapters, mesh), lcfg.scale)
  trainable, meta = checkpoint.load_trainable(spec.checkpoint_path)
  lcfg = lora.LoraConfig.from_meta(meta)
  if lcfg.enabled:
    return Teacher(spec, model, _replicate(trainable, mesh), lcfg.scale)
  dtype = jax.tree.leaves(model.params)[0].dtype
  params = jax.tree.map(lambda x, ref: jax.device_put(np.asarray(x).astype(dtype), ref.sharding), trainable,
                        model.params)
  return Teacher(spec, model, params=params)


def _replicate(tree, mesh):
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree,
                      mesh_lib.shardings_for(jax.eval_shape(lambda: tree), mesh))


# ============================================================================================ data

def load_data(c, specs, student: runtime.Model, teachers: dict[str, Teacher], counter: SkipCounter):
  """This process's share of every dataset: `groups_per_batch` is the global number of prompts per step, and
  each of the P processes reads groups_per_batch / P of them (disjoint rows; see gather_examples)."""
  contexts = {name: data_pipeline.TeacherContext(t.model.tokenizer, t.spec.teacher_messages_key)
              for name, t in teachers.items()}
  count = jax.process_count()
  pipelines = {}
  for i, spec in enumerate(specs):
    name = spec.dataset if len(specs) == 1 else f"{i}:{os.path.basename(spec.dataset)}"
    if spec.groups_per_batch % count:
      raise ValueError(f"groups_per_batch={spec.groups_per_batch} of dataset {name!r} is not divisible by the "
                       f"{count} processes; every process reads an equal share of each batch, so pick a multiple "
                       f"of {count}")
    examples = data_pipeline.load_examples(
        spec.dataset, tokenizer=student.tokenizer, counter=counter, data_files=spec.data_files, split=c.split,
        max_rows=c.max_rows or None, name=name, max_prompt_tokens=c.max_prompt_tokens,
        route=lambda row, s=spec: s.teacher_for(row).name, teacher_contexts=contexts)
    # Shards are positions of one seeded permutation of all usable rows: hosts must agree on those rows.
    distributed.check_same({"usable_rows": len(examples), "skipped": dict(counter.counts)}, f"dataset {name!r}")
    pipelines[name] = data_pipeline.Pipeline(
        examples, groups_per_batch=spec.groups_per_batch // count, seed=c.seed, num_epochs=c.num_epochs or None,
        process_index=jax.process_index(), process_count=count, name=name)
  return pipelines[next(iter(pipelines))] if len(pipelines) == 1 else data_pipeline.MultiPipeline(pipelines)


def gather_examples(local: list[dict], teacher_names: list[str], dataset_names: list[str]) -> list[dict]:
  """The step's global batch on every process, in the order one process would have read it (see interleave).
  Only what sampling and scoring need travels: prompt and teacher-context token ids, teacher and dataset (as
  indices)."""
  count = jax.process_count()
  if count == 1:
    return local
  ints = np.array([[teacher_names.index(ex["teacher"]), dataset_names.index(ex["dataset"])] for ex in local],
                  np.int32).reshape(len(local), 2)
  tokens, ints_all = distributed.allgather_rows(
      [[ex["prompt_ids"] for ex in local], [ex["teacher_ids"] for ex in local]], ints)
  return interleave([[{"prompt_ids": tokens[p][0][i], "teacher_ids": tokens[p][1][i],
                       "teacher": teacher_names[ints_all[p, i, 0]], "dataset": dataset_names[ints_all[p, i, 1]]}
                      for i in range(len(local))] for p in range(count)])


def interleave(per_process: list[list[dict]]) -> list[dict]:
  """Per-process batches -> the batch a single process would have read. Process p of P reads positions p, p + P,
  ... of each dataset's shuffled stream (data.pipeline.Pipeline), so position j of a dataset's block in the
  global batch is row j // P of that block on process j % P. Blocks (MultiPipeline: one per dataset, in order)
  are runs of equal `dataset` and have the same sizes on every process."""
  count = len(per_process)
  out, start = [], 0
  for _, block in itertools.groupby(per_process[0], key=lambda ex: ex["dataset"]):
    size = len(list(block))
    out += [per_process[p][start + i] for i in range(size) for p in range(count)]
    start += size
  return out


# ============================================================================================ one step

def stop_token_ids(tokenizer) -> list[int]:
  """eos and, when the vocab has it, the chat end-of-turn token: a completion ends at either."""
  ids = {tokenizer.eos_token_id}
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
    ids.add(im_end)
  return sorted(i for i in ids if i is not None)


def opd_loss(model_cfg, lora_enabled, lora_scale, temperature, ratio_log_cap, normalization, chunk,
             trainable, frozen, mb, totals):
  params, adapters = update.model_args(trainable, frozen, lora_enabled)
  logp_bt, entropy_bt = scoring.sequence_logprobs(
      model_cfg, params, mb["tokens"], mb["attention_mask"], mb["targets"], adapters=adapters,
      lora_scale=lora_scale, temperature=temperature, chunk_size=chunk, attention_blocks=qwen3.TRAIN_BLOCKS)
  loss, metrics = losses.importance_sampling_loss(
      logp_bt, mb["sampling_logprobs"], mb["advantages"], mb["loss_mask"], ratio_log_cap, normalization,
      token_count=totals["tokens"])
  mask = mb["loss_mask"].astype(jnp.float32)
  metrics["entropy"] = jnp.sum(entropy_bt * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return loss, metrics


_advantages = jax.jit(losses.advantages)


def build_batch(prompts, completions, sampling_lps, teacher_lps, c, shards: int,
                rows: slice = slice(None)) -> dict[str, np.ndarray]:
  """Token rows prompt + completion, right-padded to a bucket; position t predicts token t+1, so the
  completion's logprobs sit at positions [len(prompt) - 1, len(prompt) - 1 + len(completion)).

  The (batch, length) bucket comes from all rows; only the rows `rows` of the padded global batch are built
  (a process builds the rows its devices hold, update.local_rows)."""
  full = [np.concatenate([p, x]) for p, x in zip(prompts, completions)]
  b = buckets.batch_bucket(len(full), shards)
  t = buckets.length_bucket(max(len(r) for r in full))
  ids = range(b)[rows]
  real = [i for i in ids if i < len(full)]
  tokens, attention = buckets.pad_rows([full[i] for i in real], len(ids), t, left=False)
  loss_mask = np.zeros((len(ids), t), bool)
  ls = np.zeros((len(ids), t), np.float32)
  lt = np.zeros((len(ids), t), np.float32)
  for row, i in enumerate(real):
    span = slice(len(prompts[i]) - 1, len(prompts[i]) - 1 + len(completions[i]))
    loss_mask[row, span] = True
    ls[row, span] = sampling_lps[i]
    lt[row, span] = teacher_lps[i]
  adv = np.asarray(_advantages(ls, lt, loss_mask, np.float32(c.kl_penalty_coef),
                               np.float32(c.kl_discount_factor)))
  targets = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  return {"tokens": tokens, "attention_mask": attention, "targets": targets, "loss_mask": loss_mask,
          "sampling_logprobs": ls, "advantages": adv}


def score_with_teachers(examples, completions, teachers, mesh) -> list[np.ndarray]:
  """Each completion scored by the teacher its row was routed to, under that teacher's own context."""
  out: list[Any] = [None] * len(completions)
  by_teacher: dict[str, list[int]] = {}
  for i, ex in enumerate(examples):
    by_teacher.setdefault(ex["teacher"], []).append(i)
  for name, ids in by_teacher.items():
    t = teachers[name]
    scores = scoring.token_logprobs(t.model.cfg, t.params, [examples[i]["teacher_ids"] for i in ids],
                                    [completions[i] for i in ids], adapters=t.adapters, lora_scale=t.lora_scale,
                                    mesh=mesh)
    for i, s in zip(ids, scores):
      out[i] = s
  return out


def substep_slices(rows: int, num_substeps: int) -> list[slice]:
  """`num_substeps` consecutive, disjoint, non-empty slices covering `rows` rows, sizes within one of each other."""
  if not 1 <= num_substeps <= rows:
    raise ValueError(f"--config.num_substeps={num_substeps} for a step of {rows} sampled rows; expected 1 to "
                     f"{rows} (each substep updates on its own slice of the step's samples)")
  bounds = [s * rows // num_substeps for s in range(num_substeps + 1)]
  return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def update_on_samples(state, frozen, prompts, completions, sampling_lps, teacher_lps, c, *, loss_fn, optimizer,
                      mesh, shards: int) -> tuple[dict, dict[str, list[float]]]:
  """`c.num_substeps` sequential updates, each on the next slice of the sampled batch (substep_slices): the first
  at the sampling policy (importance ratios 1), later ones at params the earlier substeps moved. Returns the state
  with new trainable / opt_state and each train_step metric's per-substep values."""
  step_metrics: dict[str, list[float]] = {}
  for sl in substep_slices(len(prompts), c.num_substeps):
    state, m = _substep(state, frozen, prompts[sl], completions[sl], sampling_lps[sl], teacher_lps[sl], c,
                        loss_fn=loss_fn, optimizer=optimizer, mesh=mesh, shards=shards, apply=True)
    for name, v in distributed.fetch(m).items():
      step_metrics.setdefault(name, []).append(float(v))
  return state, step_metrics


def _substep(state, frozen, prompts, completions, sampling_lps, teacher_lps, c, *, loss_fn, optimizer, mesh,
             shards: int, apply: bool):
  """One train_step on all the rows given; `apply=False` (warm-up) leaves the state bit-identical."""
  rows = buckets.batch_bucket(len(prompts), shards)
  batch = build_batch(prompts, completions, sampling_lps, teacher_lps, c, shards,
                      rows=update.local_rows(mesh, rows))
  new_trainable, new_opt, m = update.train_step(
      state["trainable"], state["opt_state"], frozen, update.put_batch(batch, mesh, global_rows=rows),
      np.asarray(apply) if mesh is None else distributed.replicated(apply, mesh), loss_fn=loss_fn, optimizer=optimizer,
      num_micro=update.num_micro_batches(rows, c.micro_batch_size))
  return dict(state, trainable=new_trainable, opt_state=new_opt), m


def precompile(c, student, teachers, state, frozen, lcfg, *, rows: int, eos, loss_fn, optimizer, mesh,
               shards: int) -> tuple[dict, int]:
  """Compiles, before the first step, every program a step can need (`--config.precompile`): for each prompt
  length bucket up to max_prompt_tokens the sampler's prefill and decode loop, and for each sequence bucket up
  to max_prompt_tokens + max_tokens every teacher's scoring and the update, each run once on padding with
  nothing sampled and the update not applied (the state comes back bit-identical). Returns (state, programs
  compiled). Rows routed per row reach each teacher in varying numbers, so with several teachers every row
  bucket up to the step's `rows` is compiled for scoring."""
  prompt_lens = _ladder(buckets.length_bucket(c.max_prompt_tokens))
  seq_lens = _ladder(buckets.length_bucket(c.max_prompt_tokens + c.max_tokens))
  one_bucket_each = lambda sizes: sorted({buckets.batch_bucket(n, shards): n for n in sizes}.values())
  teacher_rows = one_bucket_each(range(1, rows + 1) if len(teachers) > 1 else [rows])
  substep_rows = one_bucket_each(sl.stop - sl.start for sl in substep_slices(rows, c.num_substeps))
  work = [("sample", n) for n in prompt_lens] + [("score and update", n) for n in seq_lens]
  before = runtime.compile_stats()["compile/xla_compiles"]
  t0 = time.perf_counter()
  params, adapters = update.model_args(state["trainable"], frozen, lcfg.enabled)
  _, sample_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))  # the loop's key types, unused
  for what, n in tqdm(work, desc="precompile", unit="bucket", disable=jax.process_index() != 0):
    if what == "sample":
      sampler.warm_up(student.cfg, params, rows=rows, prompt_len=n, adapters=adapters, lora_scale=lcfg.scale,
                      max_new_tokens=c.max_tokens, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                      stop_token_ids=eos, rng=sample_rng, mesh=mesh)
      continue
    for t in teachers.values():
      for k in teacher_rows:
        scoring.token_logprobs(t.model.cfg, t.params, [[0]] * k, [[0] * (n - 1)] * k, adapters=t.adapters,
                               lora_scale=t.lora_scale, mesh=mesh)
    for k in substep_rows:
      zeros = [np.zeros((n - 1,), np.float32)] * k
      state, _ = _substep(state, frozen, [[0]] * k, [[0] * (n - 1)] * k, zeros, zeros, c, loss_fn=loss_fn,
                          optimizer=optimizer, mesh=mesh, shards=shards, apply=False)
  compiled = runtime.compile_stats()["compile/xla_compiles"] - before
  log.info("precompile: %d programs for %d prompt and %d sequence length buckets in %.1f s", compiled,
           len(prompt_lens), len(seq_lens), time.perf_counter() - t0)
  return state, compiled


def _ladder(top: int) -> list[int]:
  """The length buckets from the smallest up to `top` (itself a bucket)."""
  out = [buckets.length_bucket(0)]
  while out[-1] < top:
    out.append(buckets.length_bucket(out[-1] + 1))
  return out


# ============================================================================================ main loop

class _Preemption:
  """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits with PREEMPTED_EXIT_CODE."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    log.warning("SIGTERM received: checkpointing at the end of this step, then exiting")
    self.requested = True


def run(c) -> dict[str, float]:
  """Trains per `c`; returns the last step's metrics. In a multi-process run every process calls this: each
  reads its share of the rows, the step's prompts are gathered so all processes sample and score the same
  global batch with the same SPMD programs, and process 0 alone writes metrics."""
  cli.check_config(c)
  mesh_lib.initialize()
  log_path = runtime.setup_run(c, "opd")
  preemption = _Preemption()
  mesh = mesh_lib.make_mesh(c.mesh_data, c.mesh_fsdp, c.mesh_tensor)
  shards = scoring.batch_sharding(mesh)[1]
  key = jax.random.key(c.seed)
  init_key, key = jax.random.split(key)

  with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else _nullcontext():
    student = runtime.load_model(c.model_name, c, mesh, tokenizer_path=c.tokenizer_path)
    specs = teachers_lib.dataset_teachers_from_config(c)
    rows_per_step = sum(s.groups_per_batch for s in specs) * c.group_size
    substep_slices(rows_per_step, c.num_substeps)  # refuse at start-up
    teachers = load_teachers(c, specs, student, mesh)
    counter = SkipCounter(strict=c.strict)
    data = load_data(c, specs, student, teachers, counter)
    teacher_names = sorted(teachers)
    dataset_names = list(data.pipelines) if isinstance(data, data_pipeline.MultiPipeline) else [data.name]
    lcfg = runtime.lora_config(c)
    trainable, frozen = runtime.init_trainable(c, student, mesh, init_key)
    total_steps = c.max_steps or _steps_in_data(data, c)
    optimizer = update.make_optimizer(c, total_steps)
    opt_state = runtime.init_opt_state(optimizer, trainable, mesh)
    state = {"trainable": trainable, "opt_state": opt_state,
             "rng": distributed.replicated(jax.random.key_data(key), mesh)}
    ckpt = checkpoint.Checkpointer(os.path.join(log_path, "checkpoints"), max_to_keep=c.max_to_keep)
    state, start = runtime.restore_or_start(ckpt, state, data.set_state)
    meta = runtime.run_meta(c, student)
    primary = jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(log_path, wandb_project=c.wandb_project or None, config=c.to_dict(),
                                       is_primary=primary, start_step=start + 1)
    loss_fn = functools.partial(opd_loss, student.cfg, lcfg.enabled, lcfg.scale, float(c.temperature),
                                float(c.ratio_log_cap) or None, c.loss_normalization, 128)
    eos = stop_token_ids(student.tokenizer)
    if c.precompile:
      state, _ = precompile(c, student, teachers, state, frozen, lcfg, rows=rows_per_step, eos=eos,
                            loss_fn=loss_fn, optimizer=optimizer, mesh=mesh, shards=shards)
    bar = metrics_lib.ProgressBar(total_steps, initial=start, enabled=primary)
    last: dict[str, float] = {}
    consecutive_nonfinite = 0

    # A failure mid-loop must not abandon the previous step's background save half-written.
    try:
      for step in range(start, total_steps):
        t0 = time.perf_counter()
        try:
          local = next(data)
        except StopIteration:
          log.info("end of data at step %d", step)
          break
        examples = gather_examples(local, teacher_names, dataset_names)
        rng = jax.random.wrap_key_data(state["rng"])
        rng, sample_rng = jax.random.split(rng)
        group = [ex for ex in examples for _ in range(c.group_size)]
        params, adapters = update.model_args(state["trainable"], frozen, lcfg.enabled)
        result = sampler.sample(student.cfg, params, [ex["prompt_ids"] for ex in group], adapters=adapters,
                                lora_scale=lcfg.scale, max_new_tokens=c.max_tokens, temperature=c.temperature,
                                top_k=c.top_k, top_p=c.top_p, stop_token_ids=eos, rng=sample_rng, mesh=mesh)
        t1 = time.perf_counter()
        teacher_lps = score_with_teachers(group, result.tokens, teachers, mesh)
        t2 = time.perf_counter()

        state, step_metrics = update_on_samples(
            state, frozen, [ex["prompt_ids"] for ex in group], result.tokens, result.logprobs, teacher_lps, c,
            loss_fn=loss_fn, optimizer=optimizer, mesh=mesh, shards=shards)
        state["rng"] = jax.random.key_data(rng)
        t3 = time.perf_counter()

        skipped = max(step_metrics["skipped_nonfinite"])
        consecutive_nonfinite = consecutive_nonfinite + 1 if skipped else 0
        if skipped:
          log.warning("step %d: non-finite loss or gradient; update skipped (this process's rows %s)", step,
                      [ex["where"] for ex in local])
        if consecutive_nonfinite > c.max_consecutive_nonfinite:
          raise FloatingPointError(f"{consecutive_nonfinite} consecutive steps with a non-finite loss or gradient "
                                   f"(max_consecutive_nonfinite={c.max_consecutive_nonfinite}); stopping with the "
                                   f"last good checkpoint intact in {ckpt.directory}")
        # Every process holds the global samples and teacher scores, so these are global numbers everywhere.
        rkl = [float(np.sum(ls - lt)) for ls, lt in zip(result.logprobs, teacher_lps)]
        ntok = [len(x) for x in result.tokens]
        generated = int(sum(ntok))
        out = metrics_lib.teacher_metrics([ex["teacher"] for ex in group], rkl, ntok, teachers)
        out.update({
            "sampler_trainer_kl": float(np.mean(step_metrics["sampler_trainer_kl"])),
            "entropy": float(np.mean(step_metrics["entropy"])),
            "loss": float(np.sum(step_metrics["loss"])), "grad_norm": float(np.mean(step_metrics["grad_norm"])),
            "train/skipped_nonfinite": skipped,
            "tokens/generated": generated,
            "frac_truncated": float(np.mean([r == "length" for r in result.finish_reasons])),
            "time/sample": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2, "time/step": t3 - t0,
            "throughput/tokens_per_s": generated / max(t3 - t0, 1e-9),
            # Every process validated every row (the shards are drawn from all usable rows), so the counts
            # are already global; summing over processes would count each bad row process_count times.
            **counter.metrics(),
            **runtime.compile_stats(),
        })
        if step == start:
          runtime.log_compile_stats(f"first step ({step + 1})")
        done = step + 1
        if c.eval_every and (done % c.eval_every == 0 or done == total_steps) and c.eval_dataset:
          out.update(evaluate(c, student, teachers, state, frozen, lcfg, mesh))
        writer.write(done, out)
        bar.update(done, out)
        last = out
        preempted = distributed.any_process(preemption.requested)  # all processes must stop at the same step
        if preempted or (c.save_every and done % c.save_every == 0) or done == total_steps:
          writer.flush()
          ckpt.save(done, state, data_state=runtime.data_state(data), meta=meta, force=True)
        _fault_hooks(done, ckpt)
        if preempted:
          ckpt.wait()
          writer.close()
          log.warning("preempted: checkpoint at step %d written; exiting with %d", done, PREEMPTED_EXIT_CODE)
          sys.exit(PREEMPTED_EXIT_CODE)
    finally:
      ckpt.wait()
    writer.close()
    bar.close()
  return last


def _fault_hooks(step: int, ckpt) -> None:
  """Test hook: JOPD_TEST_KILL_AFTER_STEP=N SIGKILLs this process once step N (and its checkpoint, if any) is
  durable, so tests can check that a killed run resumes exactly."""
  if os.environ.get("JOPD_TEST_KILL_AFTER_STEP") == str(step):
    ckpt.wait()
    os.kill(os.getpid(), signal.SIGKILL)


def _steps_in_data(data, c) -> int:
  pipes = getattr(data, "pipelines", {"x": data}).values()
  return min(p.batches_per_epoch for p in pipes) * max(1, c.num_epochs)


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *_):
    return False


# ============================================================================================ eval

def evaluate(c, student, teachers, state, frozen, lcfg, mesh) -> dict[str, float]:
  """Greedy samples on `eval_dataset` rows with `expected_answer`, graded; teacher KL of those samples."""
  counter = SkipCounter(strict=False)
  specs = teachers_lib.dataset_teachers_from_config(c)
  spec = specs[0]
  contexts = {name: data_pipeline.TeacherContext(t.model.tokenizer, t.spec.teacher_messages_key)
              for name, t in teachers.items()}
  examples = data_pipeline.load_examples(
      c.eval_dataset, tokenizer=student.tokenizer, counter=counter, max_rows=c.eval_rows or None, name="eval",
      max_prompt_tokens=c.max_prompt_tokens, route=lambda row: spec.teacher_for(row).name,
      teacher_contexts=contexts)
  params, adapters = update.model_args(state["trainable"], frozen, lcfg.enabled)
  eos = stop_token_ids(student.tokenizer)
  by_row = {id(ex["row"]): ex for ex in examples}
  eval_key = jax.random.wrap_key_data(distributed.replicated(jax.random.key_data(jax.random.key(0)), mesh))

  def sample_fn(rows):
    exs = [by_row[id(r)] for r in rows]
    res = sampler.sample(student.cfg, params, [ex["prompt_ids"] for ex in exs], adapters=adapters,
                         lora_scale=lcfg.scale, max_new_tokens=c.eval_max_tokens or c.max_tokens, temperature=0.0,
                         stop_token_ids=eos, rng=eval_key, mesh=mesh)
    teacher_lps = score_with_teachers(exs, res.tokens, teachers, mesh)
    # Greedy rows record the student's temperature-1 logprobs (jopd.sampler), so the KL needs no rescoring.
    return [eval_lib.EvalSample(student.tokenizer.decode(toks, skip_special_tokens=True),
                                float(np.sum(ls - lt)), len(toks))
            for toks, ls, lt in zip(res.tokens, res.logprobs, teacher_lps)]

  return eval_lib.evaluate([ex["row"] for ex in examples], sample_fn, batch_size=max(1, c.groups_per_batch))


def evaluate_standalone(c) -> dict[str, float]:
  """`python -m jopd.eval`: the student (with `load_checkpoint_path` applied) graded on `eval_dataset`."""
  cli.check_config(c)
  if not c.eval_dataset:
    raise ValueError("--config.eval_dataset is required: a JSONL (or builder) of rows with expected_answer")
  mesh_lib.initialize()
  mesh = mesh_lib.make_mesh(c.mesh_data, c.mesh_fsdp, c.mesh_tensor)
  student = runtime.load_model(c.model_name, c, mesh, tokenizer_path=c.tokenizer_path)
  teachers = load_teachers(c, teachers_lib.dataset_teachers_from_config(c), student, mesh)
  trainable, frozen = runtime.init_trainable(c, student, mesh, jax.random.key(c.seed))
  return evaluate(c, student, teachers, {"trainable": trainable}, frozen, runtime.lora_config(c), mesh)


def main(argv):
  del argv
  runtime.setup_logging()
  if CONFIG_FLAG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  runtime.run_main(run, CONFIG_FLAG.value)


if __name__ == "__main__":
  cli.run(main)
