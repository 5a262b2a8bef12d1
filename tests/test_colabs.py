"""The notebooks in colabs/ are valid nbformat 4 with cleared outputs and run top to bottom.

Each code cell is exec'd in one shared namespace (cwd = a fresh tmp dir; `!`/`%` lines dropped),
so no Jupyter kernel is needed; the notebooks' own sanity asserts make a wrong result fail. A
notebook lists the importable modules it needs in `metadata.edgeglass.requires` and is skipped
when one is absent.
"""
import glob
import importlib.util
import json
import os
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]


def load(name):
  with open(os.path.join(ROOT, "colabs", name)) as f:
    return json.load(f)


def cell_source(cell):
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def runnable(source):
  """A code cell without shell escapes and magics (`!pip ...`, `%time ...`)."""
  return "\n".join("" if line.lstrip().startswith(("!", "%")) else line
                   for line in source.splitlines())


def test_there_are_notebooks():
  assert {"01_encoders_and_features.ipynb", "02_align_quickstart.ipynb",
          "03_assistant.ipynb"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_and_cleared(name):
  nb = load(name)
  assert nb["nbformat"] == 4 and isinstance(nb["cells"], list) and nb["cells"], name
  assert nb["metadata"]["kernelspec"]["language"] == "python", name
  for i, cell in enumerate(nb["cells"]):
    assert cell["cell_type"] in ("code", "markdown", "raw"), f"{name}: cell {i}"
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, \
          f"{name}: cell {i} has outputs; clear them before committing"
      compile(runnable(cell_source(cell)), f"{name}[cell {i}]", "exec")
  first = next(c for c in nb["cells"] if c["cell_type"] == "code")
  assert "pip install" in cell_source(first) and all(
      line.lstrip().startswith("#") or not line.strip()
      for line in cell_source(first).splitlines()), f"{name}: first code cell must install nothing"


def execute(name, tmp_path, monkeypatch):
  nb = load(name)
  missing = [m for m in nb["metadata"].get("edgeglass", {}).get("requires", [])
             if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"{name} needs {missing} (pip install -e .[demo])")
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    code = compile(runnable(cell_source(cell)), f"{name}[cell {i}]", "exec")
    try:
      exec(code, namespace)  # noqa: S102 (the notebook is the code under test)
    except Exception as e:  # noqa: BLE001
      pytest.fail(f"{name}: cell {i} raised {type(e).__name__}: {e}\n"
                  f"{''.join(traceback.format_exception(e)[-6:])}", pytrace=False)


def notebook_params():
  """One param per notebook; `metadata.edgeglass.slow` (over ~30 s here) marks it slow."""
  for name in NAMES:
    slow = load(name)["metadata"].get("edgeglass", {}).get("slow", False)
    yield pytest.param(name, id=name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("name", list(notebook_params()))
def test_notebook_runs(name, tmp_path, monkeypatch):
  execute(name, tmp_path, monkeypatch)
