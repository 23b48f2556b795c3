"""SFT rendering: a conversation -> token ids through the tokenizer's own chat template, and per-token loss
weights that are 1 exactly on assistant content and its end-of-turn token (headers and user turns 0).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jopd.data import rows as rows_lib
from jopd.data.rows import RowError

TRAIN_ON = ("all_assistant", "last_assistant")
END_OF_TURN = "<|im_end|>"

# Skip reasons specific to SFT conversations (the rest come from jopd/data/rows.py: bad_type, bad_role,
# empty_content, empty_messages, render_error).
NO_ASSISTANT = "no_assistant"              # nothing to train on
LEADING_ASSISTANT = "leading_assistant"    # an assistant turn with no prompt before it
ASSISTANT_TRUNCATED = "assistant_truncated"  # every trained token lies beyond max_length
TEMPLATE_MISMATCH = "template_mismatch"    # the template renders a prefix differently from the whole


def render_sft(tokenizer: Any, messages: Sequence[dict[str, str]], *, max_length: int,
               train_on: str = "all_assistant", end_of_turn: str = END_OF_TURN) -> tuple[np.ndarray, np.ndarray]:
  """Token ids int32[T] and loss weights float32[T], T <= max_length, of one SFT conversation.

  `weights[t]` is the weight of token t as a prediction target (see jopd/data/packing.py for the shift).

  Spans are found without knowing the template's layout. The conversation is rendered to text once and
  tokenized with character offsets (exactly what `apply_chat_template(tokenize=True)` does, so the ids match).
  For assistant turn i the template renders `messages[:i]` plus the generation prompt: that text must be a
  prefix of the whole, and the trained span runs from its end to the first `end_of_turn` after it, inclusive.
  So `<|im_start|>assistant\n` and the newline after `<|im_end|>` get 0, and a template that rewrites past turns
  (Qwen3 drops their `<think>` blocks) is followed. `{% generation %}` masks are not used: most real templates,
  Qwen3's included, have none; the tests check that both agree where a template has them.
  `train_on='last_assistant'` weights only the final assistant turn. Raises RowError for bad rows (reasons
  above and in rows.py, fields named 'messages[i]...') and ValueError for a bad argument.
  """
  if train_on not in TRAIN_ON:
    raise ValueError(f"jopd/data/sft.py: train_on={train_on!r}; expected one of {TRAIN_ON}")
  if max_length < 2:
    raise ValueError(f"jopd/data/sft.py: max_length={max_length}; expected >= 2 (one input and one target)")
  eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
  if eot_id is None or eot_id == tokenizer.unk_token_id:
    raise ValueError(f"jopd/data/sft.py: end_of_turn={end_of_turn!r} is not a token of this tokenizer; pass "
                     f"the token its chat template closes assistant turns with (eos is {tokenizer.eos_token!r})")

  messages = rows_lib.validate_row({"messages": messages}, teacher_messages_keys=(),
                                   keep_assistant=True)["messages"]
  turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  if not turns:
    raise RowError(NO_ASSISTANT, "messages", "no assistant message; an SFT conversation needs at least one")
  if turns[0] == 0:
    raise RowError(LEADING_ASSISTANT, f"messages[0].role",
                   "the conversation opens with an assistant turn; expected a system or user message first")
  if train_on == "last_assistant":
    turns = turns[-1:]

  text = _render(tokenizer, messages, False)
  encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids_t = np.asarray(encoding["input_ids"], np.int32)
  offsets_t2 = np.asarray(encoding["offset_mapping"], np.int64).reshape(-1, 2)
  starts_t = offsets_t2[:, 0]
  # A byte-level tokenizer gives several tokens of one multi-byte character the same (start, start + 1), and
  # a whitespace-trimming one may give (s, s): every token covers at least its first character.
  ends_t = np.maximum(offsets_t2[:, 1], starts_t + 1)

  weights_t = np.zeros(len(ids_t), np.float32)
  for i in turns:
    header = _render(tokenizer, messages[:i], True)
    if not text.startswith(header):
      raise RowError(TEMPLATE_MISMATCH, f"messages[{i}]",
                     f"the chat template renders messages[:{i}] + generation prompt as text that is not a prefix "
                     f"of the whole conversation, so assistant turn {i} cannot be located; expected a template "
                     "whose earlier turns render the same whatever follows")
    content_start = len(header)
    eot_char = text.find(end_of_turn, content_start)
    if eot_char < 0:
      raise RowError(TEMPLATE_MISMATCH, f"messages[{i}]",
                     f"no {end_of_turn!r} after assistant turn {i}; expected the template to close assistant turns "
                     "with end_of_turn")
    content_end = eot_char + len(end_of_turn)
    # A token straddling the header/content boundary (BPE merging "\n" + "\n\n") carries content: weight 1.
    weights_t[(starts_t < content_end) & (ends_t > content_start)] = 1.0

  ids_t, weights_t = ids_t[:max_length], weights_t[:max_length]
  if not weights_t.any():
    raise RowError(ASSISTANT_TRUNCATED, f"messages[{turns[0]}]",
                   f"every trained token lies beyond max_length={max_length} (the prompt alone fills it); "
                   "expected a shorter prompt or a larger max_length")
  return ids_t, weights_t


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
  try:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
  except Exception as e:  # jinja raises TemplateError or plain exceptions from `raise_exception`
    raise RowError(rows_lib.RENDER_ERROR, "messages", f"the chat template refused these messages: {e}") from e
