"""Tiny Qwen2-style byte-level BPE tokenizers trained from text, for tests and the CPU demo.

They load back through `AutoTokenizer.from_pretrained` as a transformers `Qwen2Tokenizer` with the same ids.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers.models.qwen2 import tokenization_qwen2

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen's order: the special tokens come right after the BPE vocabulary, endoftext first.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
NUM_BYTES = 256

# Qwen3's chat layout without the <think> handling: Qwen3's own template inserts an empty
# "<think>\n\n</think>\n\n" when thinking is disabled and strips reasoning from past assistant turns; our tiny
# models never think, so every message renders as "<|im_start|>role\ncontent<|im_end|>\n" and the generation
# prompt is "<|im_start|>assistant\n". The {% generation %} span (assistant content and its <|im_end|>) lets SFT
# ask `apply_chat_template(..., return_assistant_tokens_mask=True)` for its loss weights.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen2_backend() -> tokenizers.Tokenizer:
  """An untrained BPE with exactly the normalizer, pre-tokenizer and decoder `Qwen2Tokenizer.__init__` rebuilds
  on load, so training and loading split text the same way."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  tok.normalizer = tokenizers.normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(tokenization_qwen2.PRETOKENIZE_REGEX), behavior="isolated",
                           invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = tokenizers.decoders.ByteLevel()
  return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    out_dir: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE on `texts` and returns it as a Qwen2Tokenizer with a Qwen3-style chat template.

  `vocab_size` counts everything: the 256 byte tokens, the learned merges and the 3 special tokens (fewer merges
  when the texts run out of pairs). With `out_dir` the tokenizer is also saved there (`save_pretrained`).
  """
  min_size = NUM_BYTES + len(SPECIAL_TOKENS)
  if vocab_size < min_size:
    raise ValueError(f"jopd/data/tokenizer.py: vocab_size={vocab_size} is too small; it must be >= {min_size} "
                     f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
  backend = _qwen2_backend()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size - len(SPECIAL_TOKENS), special_tokens=[], show_progress=False,
      # Every byte is a token, so any text (emoji, unseen scripts) encodes losslessly without an unk.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(texts, trainer=trainer)
  vocab = backend.get_vocab(with_added_tokens=False)
  # Merges in rank order, as BPE applies them; the serialized model is the one place that lists them.
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in json.loads(backend.to_str())["model"]["merges"]]
  for token in SPECIAL_TOKENS:
    vocab[token] = len(vocab)
  tok = tokenization_qwen2.Qwen2Tokenizer(
      vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=IM_END, pad_token=PAD_TOKEN,
      extra_special_tokens=[IM_START])
  tok.chat_template = CHAT_TEMPLATE
  if out_dir is not None:
    tok.save_pretrained(os.fspath(out_dir))
  return tok
