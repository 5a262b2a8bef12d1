"""The ablation table: seeds aggregated as mean ± std, both eval splits."""
import itertools
import json

import numpy as np
import pytest

from edgeglass_jax import compare

DIRECTIONS = [f"{a}_to_{b}" for a, b in itertools.permutations(("image", "audio", "text"), 2)]


def _metrics(test_r1, val_r1, widths=(64, 32)):
  m = {}
  for d, w in itertools.product(DIRECTIONS, widths):
    m[f"{d}/R@1@d{w}"] = test_r1 * w / max(widths)
    m[f"val/{d}/R@1@d{w}"] = val_r1 * w / max(widths)
  m.update({f"zeroshot/image/color@d{w}": 0.5 for w in widths})
  return m


def _write(tmp_path, name, metrics):
  (tmp_path / name).mkdir()
  (tmp_path / name / "results.json").write_text(json.dumps({"metrics": metrics}))
  return str(tmp_path / name)


def test_seeds_are_mean_and_sample_std(tmp_path, capsys):
  dirs = [_write(tmp_path, f"s{i}", _metrics(r, 0.9)) for i, r in enumerate((0.4, 0.5, 0.6))]
  single = _write(tmp_path, "one", _metrics(0.7, 0.2))
  assert compare.main([f"abl={','.join(dirs)}", single]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "R@1 (%) on the test split at d64 (mean ± std over the seeds of each run):"
  std = 100 * np.std([0.4, 0.5, 0.6], ddof=1)
  assert out[-2].startswith(f"| abl | 3 | 50.0 ± {std:.1f} | ")
  assert f"| 50.0 ± {std:.1f} / 25.0 ± {std / 2:.1f} | 50.0 ± 0.0 / - |" in out[-2]
  assert out[-1].startswith("| one | 1 | 70.0 | 70.0 |")
  assert compare.main(["--split", "val", single]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "R@1 (%) on the val split at d64:"
  assert out[-1].startswith("| one | 20.0 | 20.0 |")


def test_bad_runs_are_named(tmp_path):
  a = _write(tmp_path, "a", _metrics(0.5, 0.5, widths=(32,)))
  b = _write(tmp_path, "b", _metrics(0.5, 0.5, widths=(64,)))
  with pytest.raises(ValueError, match="share no width"):
    compare.compare_runs(compare.load_runs([a, b]))
  with pytest.raises(FileNotFoundError, match="missing/results.json"):
    compare.load_runs([f"x={a},{tmp_path / 'missing'}"])
  with pytest.raises(ValueError, match="given twice"):
    compare.load_runs([f"x={a}", f"x={b}"])
