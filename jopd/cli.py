"""The absl entry wrapper of `python -m jopd.train` / `jopd.sft` / `jopd.export`: known user errors (config typos,
bad config values, bad data, bad checkpoints) end the run with one readable message and a distinct exit status.

Exit statuses (docs/errors.md): 0 done, 2 refused input or config, 3 stopped on non-finite losses, 42 preempted
(SIGTERM answered with a checkpoint; jopd.train.PREEMPTED_EXIT_CODE). Anything else is a bug and keeps its
traceback. JOPD_TRACEBACK=1 shows the traceback of refused inputs too.
"""
from __future__ import annotations

import math
import os
import re
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import app, flags
from ml_collections import config_flags

USAGE_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3

# The one --config flag of every entry point (train, sft, eval, plan): absl refuses a flag defined twice in one
# process, and tests import several entry points.
CONFIG_FLAG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = tuple(os.path.join(_REPO, d) + os.sep for d in ("jopd", "models"))
_JAX_DIR = os.sep + "jax" + os.sep
# Types our own code raises on purpose for bad input (jopd's and models' error classes all derive from
# ValueError); a KeyError or OSError raised by our code names a missing key or path.
_REFUSAL_TYPES = (ValueError, KeyError, OSError)
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def _prog() -> str:
  """'jopd.train' for `python -m jopd.train`; 'jopd' when started another way (python -c, a test)."""
  path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else ""
  if path and os.path.dirname(path) == os.path.join(_REPO, "jopd"):
    return f"jopd.{os.path.splitext(os.path.basename(path))[0]}"
  return "jopd"


def _die(message: str, code: int = USAGE_EXIT_CODE) -> NoReturn:
  print(f"{_prog()}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _message(e: BaseException) -> str:
  # KeyError's str() is the repr of its argument (quotes, escaped newlines); its argument is the message.
  return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def override_error_message(e: BaseException, argv: Sequence[str]) -> str:
  """A `--config.x=...` override that ml_collections refused, as one line naming the flag and, for a typo, the
  closest valid field (ml_collections finds it; its message is an escaped repr with a traceback)."""
  text = _message(e).replace("\\n", "\n").replace("\\'", "'")
  config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "the --config file")
  match = _DID_YOU_MEAN.search(text)
  if match:
    right, wrong = match.groups()
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--") and wrong in a), f"--config.{wrong}")
    return f"{flag}: no such field in {config_file}; did you mean {flag.replace(wrong, right)}?"
  if isinstance(e, AttributeError):
    name = text.strip().strip("'\"").splitlines()[0].strip("'\"")
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--") and name and name in a), None)
    return f"{flag or name}: no such field in {config_file}; its get_config() lists the accepted fields"
  return f"a --config override could not be applied ({type(e).__name__}: {text.strip()}); check the flag names " \
         "and value types against the config file"


# ============================================================================================ config values

def _int(lo: int, what: str = ""):
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"an integer >= {lo}{what}")


def _num(test, what: str):
  return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and test(v),
          what)


def _one_of(*values):
  return (lambda v: v in values, "one of " + ", ".join(repr(x) for x in values))


# Field -> (accepts(value), what is accepted). Fields a config does not have are not checked, so one table serves
# jopd.train and jopd.sft. Values the loop would otherwise meet late (inside a jitted step, or as a silently wrong
# run: a negative kl_discount_factor trains) are refused before anything is loaded.
CONFIG_RULES = {
    "group_size": _int(1), "groups_per_batch": _int(1), "max_tokens": _int(1), "max_prompt_tokens": _int(1),
    "num_substeps": _int(1), "batch_size": _int(1), "max_length": _int(2),
    "max_steps": _int(0, " (0: until the data ends)"), "num_epochs": _int(0, " (0: repeat until max_steps)"),
    "save_every": _int(0, " (0: final checkpoint only)"), "eval_every": _int(0, " (0: no eval)"),
    "max_to_keep": _int(1), "warmup_steps": _int(0), "lora_rank": _int(0, " (0: full fine-tuning)"),
    "micro_batch_size": _int(0, " (0: no gradient accumulation)"), "max_rows": _int(0, " (0: all)"),
    "eval_rows": _int(0, " (0: all)"), "eval_max_tokens": _int(0, " (0: max_tokens)"), "top_k": _int(0, " (0: off)"),
    "max_consecutive_nonfinite": _int(0), "seed": _int(0),
    "learning_rate": _num(lambda v: v >= 0, "a number >= 0 (0: weights stay as loaded)"),
    "temperature": _num(lambda v: v > 0, "a number > 0 (the trainer scores logits / temperature)"),
    "top_p": _num(lambda v: 0 < v <= 1, "a number in (0, 1] (1: off)"),
    "kl_penalty_coef": _num(lambda v: v >= 0, "a number >= 0"),
    "kl_discount_factor": _num(lambda v: 0 <= v <= 1, "a number in [0, 1] (0: no discounting, the reference default)"),
    "ratio_log_cap": _num(lambda v: v >= 0, "a number >= 0 (0: no cap)"),
    "max_grad_norm": _num(lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "lora_alpha": _num(lambda v: v > 0, "a number > 0"),
    "adam_b1": _num(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_b2": _num(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_eps": _num(lambda v: v > 0, "a number > 0"),
    "loss_normalization": _one_of("sum", "token_mean"), "lr_schedule": _one_of("constant", "linear", "cosine"),
    "param_dtype": _one_of("bfloat16", "float32", "float16"), "remat": _one_of("none", "full", "dots"),
    "train_on": _one_of("all_assistant", "last_assistant"), "reduction": _one_of("sum", "mean"),
    "mesh_data": (lambda v: isinstance(v, int) and (v >= 1 or v == -1), "an integer >= 1, or -1 (all remaining)"),
    "mesh_fsdp": (lambda v: isinstance(v, int) and (v >= 1 or v == -1), "an integer >= 1, or -1 (all remaining)"),
    "mesh_tensor": (lambda v: isinstance(v, int) and (v >= 1 or v == -1), "an integer >= 1, or -1 (all remaining)"),
}


def check_config(c) -> None:
  """Refuses the first config value outside CONFIG_RULES with a ValueError naming `--config.<field>`, the value
  and what is accepted."""
  for field, (accepts, what) in CONFIG_RULES.items():
    if field in c and not accepts(c[field]):
      raise ValueError(f"--config.{field}={c[field]!r}: expected {what}")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # unknown flag, a value of the wrong type (--config.max_steps=abc)
    _die(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections override of a missing field
    _die(override_error_message(e, argv))
  if "config" in flags.FLAGS and flags.FLAGS.config is not None:
    try:
      check_config(flags.FLAGS.config)
    except ValueError as e:
      _die(str(e))
  return rest


def _raised_by_us(e: BaseException) -> bool:
  """The innermost frame is in jopd/ or models/ and the error did not pass through jax (a failure while tracing
  or running a jitted function is a bug, whatever its type: such inputs must be refused before any jit)."""
  frames = traceback.extract_tb(e.__traceback__)
  # jax removes its own frames from tracebacks but leaves this note on the exception.
  through_jax = any("JAX has removed its internal frames" in n for n in getattr(e, "__notes__", ()))
  if not frames or through_jax or any(_JAX_DIR in f.filename for f in frames):
    return False
  return os.path.abspath(frames[-1].filename).startswith(_OWN_DIRS)


def is_refusal(e: BaseException) -> bool:
  """True for an error our own code raised about the user's input (a refusal type raised by our code)."""
  return isinstance(e, _REFUSAL_TYPES) and _raised_by_us(e)


def guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """`main` with refused inputs and a non-finite stop turned into one message and an exit status."""
  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:
      if os.environ.get("JOPD_TRACEBACK") == "1":
        raise
      if isinstance(e, FloatingPointError) and _raised_by_us(e):
        _die(_message(e), NONFINITE_EXIT_CODE)
      if is_refusal(e):
        _die(f"{_message(e)}  ({type(e).__name__}; JOPD_TRACEBACK=1 shows where)")
      raise
  return wrapped


def run(main: Callable[[list[str]], object]) -> NoReturn:
  """`absl.app.run(main)` with config-override errors and refused inputs reported as one message (exit 2)."""
  app.run(guarded(main), flags_parser=_parse_flags)
  sys.exit(0)  # app.run exits itself; this is for type checkers
