"""Run outputs for metrics: metrics.jsonl, TensorBoard events and optional W&B, written by process 0 only and
safe to resume; a tqdm progress bar, and per-teacher aggregation of per-row KL and token counts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger("jopd.metrics")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
WANDB_ID_FILE = "wandb_run_id.txt"
_HERE = "jopd/metrics.py"


def _scalar(name: str, value: Any) -> Any:
  """A JSON-able Python value; arrays of one element (jax or numpy) become Python numbers."""
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if hasattr(value, "item") and getattr(value, "size", 1) == 1:
    return value.item()
  raise TypeError(f"{_HERE}: metric {name!r} is {type(value).__name__} of shape {getattr(value, 'shape', '?')}; "
                  "expected a number, a string or a one-element array")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl (a directory or the file), in file order."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, start_step: int) -> int:
  """Drops records with step >= start_step (and a torn last line from a killed run); returns how many it kept."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      log.warning("%s:%d: dropping an unreadable metrics line (a run killed mid-write?)", path, i + 1)
      dropped += 1
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < start_step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(line + "\n" for line in kept)
    os.replace(tmp, path)  # atomic: a kill during truncation leaves the old file, never half of it
    log.info("%s: resuming at step %d, dropped %d records of steps >= %d", path, start_step, dropped, start_step)
  return len(kept)


class MetricsWriter:
  """Writes one record per step to `<log_path>/metrics.jsonl`, TensorBoard events and (with `wandb_project`)
  W&B; every method is a no-op unless `is_primary` (process 0).

  `start_step` is the first step this run will log: records with step >= start_step left by an earlier run with
  this log_path are dropped (TensorBoard events purged), so a killed-and-resumed run ends with the same
  metrics.jsonl as an uninterrupted one. Pass all metrics of a step in one `write` call: one line per step.
  `config` (dict or ConfigDict) is saved as `config.json` and given to W&B.
  """

  def __init__(self, log_path: str | os.PathLike, *, wandb_project: str | None = None,
               config: Mapping[str, Any] | Any | None = None, is_primary: bool = True, start_step: int = 0):
    self.log_path = os.fspath(log_path)
    self.is_primary = is_primary
    self._file = self._tb = self._wandb_run = None
    if not is_primary:
      return
    if wandb_project:
      try:
        import wandb  # optional dependency: only runs that ask for W&B need it
      except ImportError as e:
        raise ImportError(f"{_HERE}: wandb_project={wandb_project!r} needs the wandb package, which is not "
                          "installed; install it (pip install 'jopd[wandb]') or leave wandb_project unset") from e
    os.makedirs(self.log_path, exist_ok=True)
    config_dict = _config_dict(config)
    if config_dict is not None:
      with open(os.path.join(self.log_path, CONFIG_FILE), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    self.metrics_path = os.path.join(self.log_path, METRICS_FILE)
    truncate_metrics(self.metrics_path, start_step)
    self._file = open(self.metrics_path, "a")
    from tensorboardX import SummaryWriter  # protobuf import cost only for the process that writes
    self._tb = SummaryWriter(self.log_path, purge_step=start_step if start_step > 0 else None, flush_secs=30)
    if wandb_project:
      self._wandb_run = _wandb_init(wandb, wandb_project, self.log_path, config_dict)

  def write(self, step: int, metrics: Mapping[str, Any]):
    if not self.is_primary:
      return
    if self._file is None:
      raise RuntimeError(f"{_HERE}: MetricsWriter for {self.log_path} is closed")
    values = {k: _scalar(k, v) for k, v in sorted(metrics.items()) if k != "step"}
    record = {"step": int(step), **values}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # a killed run keeps every finished step
    for k, v in values.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(k, v, int(step))
    if self._wandb_run is not None:
      self._wandb_run.log(values, step=int(step))

  def flush(self):
    """Makes everything written so far durable, e.g. before a checkpoint."""
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())
      self._tb.flush()

  def close(self):
    if self._file is None:
      return
    self.flush()
    self._file.close()
    self._tb.close()
    if self._wandb_run is not None:
      self._wandb_run.finish()
    self._file = self._tb = self._wandb_run = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc):
    self.close()


def _config_dict(config: Any) -> dict[str, Any] | None:
  if config is None:
    return None
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    return config.to_dict()
  return dict(config)


def _wandb_init(wandb, project: str, log_path: str, config: dict[str, Any] | None):
  """Starts or resumes the run of this log_path: its id is kept beside metrics.jsonl."""
  id_path = os.path.join(log_path, WANDB_ID_FILE)
  run_id = open(id_path).read().strip() if os.path.exists(id_path) else wandb.util.generate_id()
  with open(id_path, "w") as f:
    f.write(run_id)
  return wandb.init(project=project, id=run_id, resume="allow", dir=log_path, config=config)


class ProgressBar:
  """A tqdm bar over steps showing the step's teacher KL and throughput; silent unless enabled (process 0)."""

  def __init__(self, total: int | None, initial: int = 0, enabled: bool = True, desc: str = "train"):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

  def update(self, step: int, metrics: Mapping[str, Any]):
    if self._bar is None:
      return
    postfix = {"step": step}
    for key, short in (("teacher_kl", "kl"), ("throughput/tokens_per_s", "tok/s")):
      if key in metrics:
        postfix[short] = f"{float(metrics[key]):.4g}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(1)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def teacher_metrics(teacher_names: Sequence[str], reverse_kl_sum_b: Any, tokens_b: Any,
                    all_teachers: Iterable[str] = ()) -> dict[str, float]:
  """Per-teacher metrics of one step from per-row (per completion) arrays.

  teacher_names: the teacher that scored each row; reverse_kl_sum_b: each row's summed reverse KL
  `sum_t m_t (ls_t - lt_t)`; tokens_b: each row's completion token count. Returns `teacher_kl` (per-token mean
  over the batch), and for every teacher `teacher_kl/<t>` (its per-token mean; absent when it scored no token),
  `teacher_route/<t>/scored` (rows it scored) and `teacher_route/<t>/tokens`. Teachers in `all_teachers` that
  scored nothing still get zero counts, so an idle teacher shows up instead of vanishing.
  """
  kl_b = np.asarray(reverse_kl_sum_b, np.float64).reshape(-1)
  tok_b = np.asarray(tokens_b, np.float64).reshape(-1)
  names = list(teacher_names)
  if not len(names) == kl_b.size == tok_b.size:
    raise ValueError(f"{_HERE} teacher_metrics: {len(names)} teacher names, {kl_b.size} KL sums and {tok_b.size} "
                     "token counts; expected one of each per row")
  out: dict[str, float] = {}
  total_tokens = tok_b.sum()
  out["teacher_kl"] = float(kl_b.sum() / total_tokens) if total_tokens > 0 else math.nan
  order = list(dict.fromkeys([*all_teachers, *names]))
  names_arr = np.asarray(names, dtype=object)
  for t in order:
    rows = names_arr == t
    tokens = float(tok_b[rows].sum())
    slug = metric_slug(t)
    out[f"teacher_route/{slug}/scored"] = int(rows.sum())
    out[f"teacher_route/{slug}/tokens"] = tokens
    if tokens > 0:
      out[f"teacher_kl/{slug}"] = float(kl_b[rows].sum() / tokens)
  return out


def metric_slug(name: str) -> str:
  """A teacher name as one metric-path component: '/ckpts/Qwen3-32B' -> 'ckpts_Qwen3-32B'."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "teacher"
