"""The README documents every config field with its real default, and every config file loads."""
import ast
import glob
import importlib.util
import os
import re

import pytest

from jopd import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_rows() -> list[tuple[str, str, str]]:
  """(field, default, used by) rows of the README's config table."""
  text = open(os.path.join(REPO, "README.md")).read()
  return re.findall(r"^\| `(\w+)` \| `(.*?)` \| ([a-z, ]+) \|", text, flags=re.M)


def test_readme_lists_every_config_field_with_its_default():
  rows = _readme_rows()
  documented = {name for name, _, _ in rows}
  fields = {**config.opd().to_dict(), **config.sft().to_dict()}
  missing = sorted(set(fields) - documented)
  assert not missing, f"README.md 'All config fields' lacks {missing}"
  stale = sorted(documented - set(fields))
  assert not stale, f"README.md documents fields that no longer exist: {stale}"
  for name, default, used_by in rows:
    cfg = config.sft() if used_by == "sft" else config.opd()
    value = ast.literal_eval(default.replace("\\|", "|"))
    expected = cfg[name]
    assert (list(value) if isinstance(value, tuple) else value) == (
        list(expected) if isinstance(expected, tuple) else expected), name


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_config_files_load_and_have_a_command_docstring(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert "python -m jopd." in (module.__doc__ or ""), f"{path}: docstring must give the command"
  assert c.learning_rate > 0
