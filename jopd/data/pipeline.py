"""Prompt examples for OPD: rows validated, routed and rendered up front, then served by a grain pipeline.

Batches are seeded-shuffled, sharded per process and resumable from a JSON-able iterator state.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grain

from jopd.data import builders
from jopd.data import render
from jopd.data import rows as rows_lib
from jopd.data.rows import RowError, SkipCounter

log = logging.getLogger("jopd.data")

# Routes a contract-valid row to the name of the teacher that scores it, or raises RowError (missing_route,
# route_not_string, unknown_route, ...) to skip it; jopd/teachers.py provides the real one.
RouteFn = Callable[[dict[str, Any]], str | None]


@dataclasses.dataclass(frozen=True)
class TeacherContext:
  """How a teacher's context is rendered: its tokenizer (chat template) and the row key of its privileged
  messages (falls back to `messages` when a row lacks it)."""
  tokenizer: Any
  messages_key: str = rows_lib.DEFAULT_TEACHER_MESSAGES_KEY


def prepare_examples(records: Iterable[builders.Record], *, tokenizer: Any, counter: SkipCounter,
                     dataset_name: str = "default", max_prompt_tokens: int | None = None,
                     max_teacher_tokens: int | None = None, route: RouteFn | None = None,
                     teacher_contexts: Mapping[str, TeacherContext] | None = None) -> list[dict[str, Any]]:
  """Validates, routes and renders every record; bad ones are counted in `counter` (or raise when strict).

  Each example is a dict: `prompt_ids` [L] int32 (student prompt with generation prompt), `teacher_ids` [Lt]
  int32 (teacher context; the same array when identical), `teacher` (route result or None), `dataset`,
  `where` ('file:line'), `row` (the normalised row: messages, expected_answer, extra_info, ...).
  `teacher_contexts[name]` renders the context of rows routed to `name`; others use the student tokenizer and
  `teacher_messages`. `max_teacher_tokens` defaults to `max_prompt_tokens`.
  """
  contexts = dict(teacher_contexts or {})
  default_context = TeacherContext(tokenizer)
  keys = {default_context.messages_key} | {c.messages_key for c in contexts.values()}
  if max_teacher_tokens is None:
    max_teacher_tokens = max_prompt_tokens
  examples = []
  for record in records:
    try:
      if record.error is not None:
        raise record.error
      row = rows_lib.validate_row(record.row, teacher_messages_keys=sorted(keys))
      teacher = route(row) if route is not None else None
      context = contexts.get(teacher, default_context) if teacher is not None else default_context
      prompt_ids = render.render_prompt(tokenizer, row["messages"], max_prompt_tokens)
      if context.tokenizer is tokenizer and row.get(context.messages_key) is None:
        teacher_ids = prompt_ids  # same template, same messages: share rather than render twice
      else:
        teacher_ids = render.render_teacher_context(context.tokenizer, row, max_teacher_tokens,
                                                    context.messages_key)
    except RowError as e:
      counter.skip(e, record.where)
      continue
    examples.append({"prompt_ids": prompt_ids, "teacher_ids": teacher_ids, "teacher": teacher,
                     "dataset": dataset_name, "where": record.where, "row": row})
  log.info("dataset %s: %d usable rows, %d skipped so far %s", dataset_name, len(examples), counter.total,
           dict(counter.counts))
  return examples


def load_examples(dataset: str, *, tokenizer: Any, counter: SkipCounter, data_files=None, split: str = "train",
                  max_rows: int | None = None, name: str | None = None, cache_dir: str | None = None,
                  **prepare_kwargs) -> list[dict[str, Any]]:
  """`builders.read_records` followed by `prepare_examples`: the config's dataset fields -> examples."""
  records = builders.read_records(dataset, data_files, split=split, max_rows=max_rows, cache_dir=cache_dir)
  return prepare_examples(records, tokenizer=tokenizer, counter=counter, dataset_name=name or dataset,
                          **prepare_kwargs)


class Pipeline:
  """Batches (lists) of `groups_per_batch` elements from this process's share of `elements`.

  Each epoch is a fresh seeded permutation of all elements; process p of P takes positions p, p+P, ... of it,
  so processes see disjoint rows and equally many batches (the `len % P` tail of each epoch's permutation is
  left out). `num_epochs=None` repeats forever; otherwise iteration stops at the end of the data (a partial
  last batch is dropped so batch shapes never change). `get_state()` / `set_state()` resume exactly.
  """

  def __init__(self, elements: Sequence[Any], *, groups_per_batch: int, seed: int = 0,
               num_epochs: int | None = None, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, name: str = "dataset"):
    if groups_per_batch < 1:
      raise ValueError(f"config field 'groups_per_batch'={groups_per_batch} for {name!r}: expected >= 1")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs={num_epochs} for {name!r}: expected >= 1, or None to repeat forever")
    n = len(elements)
    per_process = n // process_count
    if per_process < groups_per_batch:
      raise ValueError(f"dataset {name!r} has {n} usable rows: {per_process} per process for "
                       f"{process_count} processes, fewer than groups_per_batch={groups_per_batch}")
    if n % process_count:
      log.info("dataset %s: %d rows per epoch (of %d) left out so that %d processes get equal shares", name,
               n % process_count, n, process_count)
    self.name, self.groups_per_batch, self.seed = name, groups_per_batch, seed
    self.batches_per_epoch = per_process // groups_per_batch
    self._fingerprint = {"name": name, "num_elements": n, "groups_per_batch": groups_per_batch, "seed": seed,
                         "shuffle": shuffle, "process_index": process_index, "process_count": process_count}
    everything = grain.MapDataset.source(elements)
    if shuffle:
      # Indices past len() select later epochs, each shuffled with its own seed (seed + epoch).
      everything = everything.shuffle(seed=seed)

    def global_index(i: int, _) -> Any:
      epoch, j = divmod(i, per_process)
      return everything[epoch * n + j * process_count + process_index]

    local = grain.MapDataset.range(per_process).repeat(num_epochs).map_with_index(global_index)
    local = local.batch(groups_per_batch, drop_remainder=True, batch_fn=list)
    # In-memory elements: no reader threads, no prefetch buffer (a prefetched batch would outlive a restore).
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._iterator = iter(local.to_iter_dataset(options))

  def __iter__(self) -> Iterator[list[Any]]:
    return self

  def __next__(self) -> list[Any]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {**self._fingerprint, "iterator": self._iterator.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for key, value in self._fingerprint.items():
      if state.get(key) != value:
        raise ValueError(f"data iterator state of {self.name!r} was saved with {key}={state.get(key)!r} but this "
                         f"run has {key}={value!r}; restore with the same data, seed and process layout")
    self._iterator.set_state(dict(state["iterator"]))


class MultiPipeline:
  """One batch per step from each named pipeline, concatenated in the given order; each element is a shallow
  copy of the pipeline's dict element with `dataset` set to the pipeline's name. Stops when any one stops."""

  def __init__(self, pipelines: Mapping[str, Pipeline]):
    if not pipelines:
      raise ValueError("MultiPipeline needs at least one dataset")
    self.pipelines = dict(pipelines)

  def __iter__(self) -> Iterator[list[dict[str, Any]]]:
    return self

  def __next__(self) -> list[dict[str, Any]]:
    return [{**element, "dataset": name} for name, p in self.pipelines.items() for element in next(p)]

  def get_state(self) -> dict[str, Any]:
    return {name: p.get_state() for name, p in self.pipelines.items()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if set(state) != set(self.pipelines):
      raise ValueError(f"data iterator state has datasets {sorted(state)} but this run has "
                       f"{sorted(self.pipelines)}")
    for name, p in self.pipelines.items():
      p.set_state(state[name])
