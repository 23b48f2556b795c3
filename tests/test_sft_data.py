"""Tests for jopd/data/sft.py: loss weights are 1 exactly on assistant content and its <|im_end|>, located
through the tokenizer's own chat template; truncation and bad conversations behave as documented."""
import copy

import numpy as np
import pytest

from jopd.data import packing, rows, sft
from jopd.data.tokenizer import train_tokenizer

TEXTS = ["what is 2+2? it is 4. and 3+3? 6. be brief and exact, please.",
         "<think>\nadd the numbers\n</think>\n\nThe answer is 46.", "hello world, the quick brown fox"] * 10
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is 2+2?"},
    {"role": "assistant", "content": "it is 4."},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6, the quick brown fox 🙂"},
]

# Not Qwen's template: a made-up one without {% generation %}, with another header layout, a default system
# prompt, and past assistant turns stripped of their <think> block (as Qwen3's own template does), so that
# rendering `messages[:i+1]` alone would NOT reproduce turn i as it appears in the whole conversation.
REWRITING_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m['content'] %}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + ':\\n\\n' + content + '<|im_end|>\\n\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant:\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(TEXTS, vocab_size=400)


def _weighted_spans(tok, ids_t, weights_t):
  """Decoded text of each maximal run of weight-1 tokens."""
  spans, run = [], []
  for token, w in zip(ids_t.tolist(), weights_t.tolist()):
    if w:
      run.append(token)
    elif run:
      spans.append(tok.decode(run)); run = []
  return spans + ([tok.decode(run)] if run else [])


def test_two_turn_weights_are_exactly_assistant_content_and_end_of_turn(tok):
  ids_t, weights_t = sft.render_sft(tok, CONVERSATION, max_length=4096)
  reference = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
  assert ids_t.dtype == np.int32 and weights_t.dtype == np.float32
  assert ids_t.tolist() == reference["input_ids"]  # the template's own tokens, nothing added or dropped
  assert _weighted_spans(tok, ids_t, weights_t) == ["it is 4.<|im_end|>", "6, the quick brown fox 🙂<|im_end|>"]
  # Everything else is 0: the unweighted text is exactly the template output minus those spans, i.e. the
  # headers "<|im_start|>assistant\n", the "\n" after each <|im_end|>, and the system/user turns.
  unweighted = tok.decode(ids_t[weights_t == 0].tolist())
  assert unweighted == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is 2+2?<|im_end|>\n"
                        "<|im_start|>assistant\n\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n\n")
  # The template has {% generation %} markers: transformers' own assistant mask agrees token for token.
  np.testing.assert_array_equal(weights_t, np.asarray(reference["assistant_masks"], np.float32))
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert weights_t[ids_t == im_end].tolist() == [0, 0, 1, 0, 1]  # system, user, assistant, user, assistant


def test_last_assistant_weights_only_the_final_turn(tok):
  ids_all, weights_all = sft.render_sft(tok, CONVERSATION, max_length=4096)
  ids_last, weights_last = sft.render_sft(tok, CONVERSATION, max_length=4096, train_on="last_assistant")
  np.testing.assert_array_equal(ids_last, ids_all)
  assert _weighted_spans(tok, ids_last, weights_last) == ["6, the quick brown fox 🙂<|im_end|>"]
  first_end = int(np.flatnonzero(ids_all == tok.convert_tokens_to_ids("<|im_end|>"))[2])
  assert weights_last[:first_end + 1].sum() == 0 and weights_all[:first_end + 1].sum() > 0


def test_spans_follow_a_template_that_rewrites_past_turns(tok):
  tok = copy.deepcopy(tok)
  tok.chat_template = REWRITING_TEMPLATE
  messages = [{"role": "user", "content": "what is 12+34?"},
              {"role": "assistant", "content": "<think>\nadd the numbers\n</think>\n\nThe answer is 46."},
              {"role": "user", "content": "and 3+3?"},
              {"role": "assistant", "content": "<think>\nadd\n</think>\n\n6"}]
  ids_t, weights_t = sft.render_sft(tok, messages, max_length=4096)
  assert ids_t.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
  # The past turn is trained on as the whole conversation shows it (reasoning stripped), the last one whole.
  assert _weighted_spans(tok, ids_t, weights_t) == ["The answer is 46.<|im_end|>",
                                                    "<think>\nadd\n</think>\n\n6<|im_end|>"]
  assert tok.decode(ids_t[weights_t == 0].tolist()).startswith("<|im_start|>system\nYou are helpful.")


def test_truncation_keeps_a_prefix_and_refuses_rows_with_nothing_left(tok):
  ids_t, weights_t = sft.render_sft(tok, CONVERSATION, max_length=4096)
  second_start = int(np.flatnonzero(weights_t)[-1]) - 3  # inside the second assistant turn
  cut_ids, cut_weights = sft.render_sft(tok, CONVERSATION, max_length=second_start)
  np.testing.assert_array_equal(cut_ids, ids_t[:second_start])
  np.testing.assert_array_equal(cut_weights, weights_t[:second_start])
  first_start = int(np.flatnonzero(weights_t)[0])
  with pytest.raises(rows.RowError) as info:
    sft.render_sft(tok, CONVERSATION, max_length=first_start)
  assert info.value.reason == sft.ASSISTANT_TRUNCATED and info.value.field == "messages[2]"
  # What comes out fits a packer whose seq_len is max_length, and packs with the documented shift.
  batch = packing.pack_rows([(cut_ids, cut_weights)], [[0]], seq_len=second_start)
  assert batch["weights_bt"].sum() == cut_weights[1:].sum()


@pytest.mark.parametrize("messages, reason, field", [
    ([], rows.EMPTY_MESSAGES, "messages"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], sft.NO_ASSISTANT, "messages"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], rows.BAD_ROLE, "messages[1].role"),
    ([{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}], sft.LEADING_ASSISTANT,
     "messages[0].role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], rows.BAD_TYPE,
     "messages[1].content"),
    ("hi", rows.BAD_TYPE, "messages"),
])
def test_bad_conversations_are_row_errors_with_reasons(tok, messages, reason, field):
  with pytest.raises(rows.RowError) as info:
    sft.render_sft(tok, messages, max_length=64)
  assert (info.value.reason, info.value.field) == (reason, field)


def test_bad_rows_are_counted_and_strict_raises_with_location(tok):
  counter, strict = rows.SkipCounter(), rows.SkipCounter(strict=True)
  bad = [[], [{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}]]
  for line, messages in enumerate(bad, start=1):
    try:
      sft.render_sft(tok, messages, max_length=64)
    except rows.RowError as e:
      counter.skip(e, f"train.jsonl:{line}")
  assert counter.metrics() == {"data/skipped/empty_messages": 1, "data/skipped/no_assistant": 2}
  with pytest.raises(rows.RowError, match=r"train\.jsonl:2: field 'messages'.*no_assistant"):
    try:
      sft.render_sft(tok, bad[1], max_length=64)
    except rows.RowError as e:
      strict.skip(e, "train.jsonl:2")


def test_bad_arguments_name_what_is_accepted(tok):
  with pytest.raises(ValueError, match="train_on='first'.*all_assistant"):
    sft.render_sft(tok, CONVERSATION, max_length=64, train_on="first")
  with pytest.raises(ValueError, match="end_of_turn='<eot>'.*eos is '<\\|im_end\\|>'"):
    sft.render_sft(tok, CONVERSATION, max_length=64, end_of_turn="<eot>")
