"""Retrieval metrics on hand-built rankings and against a brute-force loop reference."""
import itertools
import json

import numpy as np
import pytest

from edgeglass_jax import evaluate as E


def ref_metrics(sim, pos, ks=(1, 5, 10)):
  """Loops: pessimistic ranks (a negative tied with a positive ranks ahead of it)."""
  recalls = {k: [] for k in ks}
  aps = []
  nq, nc = sim.shape
  for i in range(nq):
    p_idx = [j for j in range(nc) if pos[i, j]]
    if not p_idx:
      continue
    ranks = []
    for p in p_idx:
      r = 1
      for j in range(nc):
        if j == p:
          continue
        if not pos[i, j] and sim[i, j] >= sim[i, p]:
          r += 1
        elif pos[i, j] and (sim[i, j] > sim[i, p] or (sim[i, j] == sim[i, p] and j < p)):
          r += 1
      ranks.append(r)
    ranks.sort()
    aps.append(sum((t + 1) / r for t, r in enumerate(ranks)) / len(ranks))
    for k in ks:
      recalls[k].append(ranks[0] <= k)
  out = {f"R@{k}": float(np.mean(recalls[k])) for k in ks}
  out["mAP"] = float(np.mean(aps))
  return out


def assert_metrics(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_perfect_and_reversed_rankings():
  n = 12
  rng = np.random.default_rng(0)
  sim = rng.uniform(0, 0.5, (n, n)) + np.eye(n)
  assert E.retrieval_metrics(sim) == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mAP": 1.0}
  reversed_sim = -sim  # every positive is ranked last
  got = E.retrieval_metrics(reversed_sim)
  assert got == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mAP": pytest.approx(1 / n)}


def test_ties_are_pessimistic():
  # Constant scores: the only positive ranks last of 10.
  got = E.retrieval_metrics(np.zeros((10, 10)))
  assert got == {"R@1": 0.0, "R@5": 0.0, "R@10": 1.0, "mAP": pytest.approx(0.1)}
  # Two positives tied with a negative below a better negative: ranks 3 and 4.
  sim = np.array([[0.5, 0.5, 0.9, 0.5]])
  pos = np.array([[True, False, False, True]])
  got = E.retrieval_metrics(sim, pos, ks=(1, 2, 3))
  assert got == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0, "mAP": pytest.approx((1 / 3 + 2 / 4) / 2)}
  # Positives tied only with each other keep their ranks 1 and 2.
  got = E.retrieval_metrics(np.array([[0.7, 0.7, 0.1]]), np.array([[True, True, False]]),
                            ks=(1,))
  assert got == {"R@1": 1.0, "mAP": 1.0}


def test_several_positives_and_no_positive_in_top_k():
  sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5],
                  [0.1, 0.2, 0.3, 0.4, 0.5],
                  [0.3, 0.1, 0.9, 0.2, 0.0]])
  pos = np.array([[0, 1, 0, 1, 0],     # ranks 2, 4: AP (1/2 + 2/4) / 2
                  [1, 0, 0, 0, 0],     # rank 5: AP 1/5
                  [1, 1, 1, 0, 0]], bool)  # ranks 1, 2, 4: AP (1 + 1 + 3/4) / 3
  got = E.retrieval_metrics(sim, pos, ks=(1, 2, 4))
  assert got["R@1"] == pytest.approx(1 / 3)
  assert got["R@2"] == pytest.approx(2 / 3)
  assert got["R@4"] == pytest.approx(2 / 3)
  assert got["mAP"] == pytest.approx((0.5 + 0.2 + 2.75 / 3) / 3)


def test_queries_without_positive_are_excluded():
  sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.6]])
  pos = np.array([[True, False], [True, False], [False, False]])
  got = E.retrieval_metrics(sim, pos, ks=(1,))
  assert got == {"R@1": 0.5, "mAP": pytest.approx(0.75)}
  with pytest.raises(ValueError, match="no query has a positive"):
    E.retrieval_metrics(sim, np.zeros((3, 2), bool))


def test_k_beyond_candidates_and_bad_input():
  sim = np.array([[0.1, 0.2, 0.3]] * 3)
  got = E.retrieval_metrics(sim, ks=(1, 5, 10))
  assert got["R@10"] == 1.0 and got["R@5"] == 1.0
  with pytest.raises(ValueError, match="square"):
    E.retrieval_metrics(np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"positives \(2, 2\) do not match sim \(3, 3\)"):
    E.retrieval_metrics(sim, np.eye(2, dtype=bool))
  with pytest.raises(ValueError, match="NaN"):
    E.retrieval_metrics(np.full((2, 2), np.nan))


@pytest.mark.parametrize("case", ["diagonal", "groups", "random"])
def test_against_brute_force(case, monkeypatch):
  rng = np.random.default_rng({"diagonal": 1, "groups": 2, "random": 3}[case])
  nq, nc = (30, 30) if case != "random" else (25, 40)
  sim = rng.integers(0, 6, (nq, nc)).astype(np.float32)  # many ties
  if case == "diagonal":
    pos = np.eye(nq, dtype=bool)
  elif case == "groups":
    g = rng.integers(0, 6, nq)
    pos = g[:, None] == g[None, :]
  else:
    pos = rng.uniform(size=(nq, nc)) < 0.1
  want = ref_metrics(sim, pos, ks=(1, 3, 10))
  assert_metrics(E.retrieval_metrics(sim, pos, ks=(1, 3, 10)), want)
  monkeypatch.setattr(E, "_ROW_BLOCK", 2 * nc)  # row blocks of 2 give the same numbers
  assert_metrics(E.retrieval_metrics(sim, pos, ks=(1, 3, 10)), want)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tri():
  rng = np.random.default_rng(5)
  n, d = 30, 16
  base = rng.standard_normal((n, d))
  z = {"image": base + 0.3 * rng.standard_normal((n, d)),
       "audio": base + 1.0 * rng.standard_normal((n, d)),
       "text": base + 0.6 * rng.standard_normal((n, d))}
  groups = np.arange(n) % 10
  return z, groups


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_six_directions_names_and_values(tri):
  z, groups = tri
  out = E.six_direction_retrieval(z, groups, widths=(8, 16))
  dirs = [f"{a}_to_{b}" for a, b in itertools.permutations(("image", "audio", "text"), 2)]
  want_keys = {f"{d}/{m}@d{w}" for d in dirs for m in ("R@1", "R@5", "R@10", "mAP")
               for w in (16, 8)}
  assert set(out) == want_keys
  pos = groups[:, None] == groups[None, :]
  for src, dst, w in [("image", "audio", 8), ("text", "image", 16)]:
    sim = _unit(z[src][:, :w]) @ _unit(z[dst][:, :w]).T
    ref = ref_metrics(sim, pos)
    for m, v in ref.items():
      assert out[f"{src}_to_{dst}/{m}@d{w}"] == pytest.approx(v, abs=1e-9)
  # Default: full width, no suffix, each example matches only itself.
  plain = E.six_direction_retrieval(z)
  assert set(plain) == {f"{d}/{m}" for d in dirs for m in ("R@1", "R@5", "R@10", "mAP")}
  sim = _unit(z["audio"]) @ _unit(z["text"]).T
  assert plain["audio_to_text/mAP"] == pytest.approx(ref_metrics(sim, np.eye(30, dtype=bool))
                                                     ["mAP"])


def test_six_directions_with_missing_modalities(tri):
  z, groups = tri
  has_audio = np.arange(30) % 3 != 0
  out = E.six_direction_retrieval(z, groups, present={"audio": has_audio})
  pos = groups[:, None] == groups[None, :]
  sim = _unit(z["audio"]) @ _unit(z["text"]).T
  want = ref_metrics(sim[has_audio], pos[has_audio])
  assert out["audio_to_text/R@1"] == pytest.approx(want["R@1"])
  sim = _unit(z["text"]) @ _unit(z["audio"]).T
  want = ref_metrics(sim[:, has_audio], pos[:, has_audio])
  assert out["text_to_audio/mAP"] == pytest.approx(want["mAP"])
  two = E.six_direction_retrieval({"image": z["image"], "text": z["text"]})
  assert {k.split("/")[0] for k in two} == {"image_to_text", "text_to_image"}
  with pytest.raises(ValueError, match=r"widths \[32\]"):
    E.six_direction_retrieval(z, widths=(32, 8))
  with pytest.raises(ValueError, match="unknown modalities"):
    E.six_direction_retrieval({"image": z["image"], "video": z["text"]})
  with pytest.raises(ValueError, match="image_to_audio: .*no query"):
    E.six_direction_retrieval(z, present={"audio": np.zeros(30, bool)})


def test_zero_shot_classification():
  prompts = np.eye(3, 4)
  queries = np.array([[1, 0, 0, 0], [0.1, 1, 0, 0], [0, 0, 2, 0], [3, 0.2, 0, 0]], float)
  assert E.zero_shot_classification(queries, prompts, [0, 1, 1, 0]) == 0.75
  assert E.zero_shot_classification(queries, prompts, [0, 1, 1, 0], mask=[1, 1, 0, 1]) == 1.0
  rng = np.random.default_rng(6)
  q, p = rng.standard_normal((50, 8)), rng.standard_normal((5, 8))
  labels = rng.integers(0, 5, 50)
  want = np.mean([int(np.argmax([np.dot(qi, pc) / np.linalg.norm(pc) for pc in p]) == y)
                  for qi, y in zip(q, labels)])
  assert E.zero_shot_classification(q, p, labels) == pytest.approx(want)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    E.zero_shot_classification(queries, prompts, [0, 1, 3, 0])


def test_matryoshka_curve():
  metrics = {"image_to_text/R@1@d64": 0.5, "text_to_image/R@1@d64": 0.7,
             "image_to_text/R@1@d32": 0.2, "text_to_image/R@1@d32": 0.4,
             "image_to_text/mAP@d64": 0.9, "image_to_text/R@1": 0.99, "loss": 3.0}
  curve = E.matryoshka_curve(metrics)
  assert list(curve) == [64, 32]
  assert curve[64] == pytest.approx(0.6) and curve[32] == pytest.approx(0.3)
  assert E.matryoshka_curve(metrics, "mAP") == {64: pytest.approx(0.9)}
  with pytest.raises(ValueError, match="R@5"):
    E.matryoshka_curve(metrics, "R@5")


def test_format_table(tri):
  z, groups = tri
  out = E.six_direction_retrieval(z, groups, widths=(16, 4))
  table = E.format_table({**out, "loss": 1.0})
  lines = table.splitlines()
  assert len(lines) == 3 + 6
  assert "d16" in lines[0] and "d4" in lines[0] and lines[0].index("d16") < lines[0].index("d4")
  assert lines[1].split() == ["direction"] + ["|", "R@1", "R@5", "R@10", "mAP"] * 2
  row = next(l for l in lines if l.startswith("audio_to_image "))
  cells = row.replace("|", " ").split()
  assert cells[1] == f"{100 * out['audio_to_image/R@1@d16']:.1f}"
  assert cells[-1] == f"{100 * out['audio_to_image/mAP@d4']:.1f}"
  assert E.format_table({"loss": 1.0}) == "(no retrieval metrics)"


def _run_metrics(r1, widths, zero_shot):
  m = {f"{a}_to_{b}/R@1@d{w}": r1 * w / max(widths)
       for a, b in itertools.permutations(("image", "audio", "text"), 2) for w in widths}
  m.update({f"zeroshot/image/color@d{w}": zero_shot for w in widths})
  return m


def test_compare_runs_table_and_cli(tmp_path, capsys):
  from edgeglass_jax import compare
  runs = {"a": [_run_metrics(0.5, (64, 32), 0.25)], "b": [_run_metrics(0.8, (64,), 0.75)]}
  table = compare.compare_runs(runs)
  lines = table.splitlines()
  assert lines[0] == "R@1 (%) on the test split at d64:"
  assert lines[-2] == "| a | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 / 25.0 | 25.0 / - |"
  assert lines[-1] == "| b | 80.0 | 80.0 | 80.0 | 80.0 | 80.0 | 80.0 | 80.0 / - | 75.0 / - |"
  assert "| a | 25.0 |" in compare.compare_runs(runs | {"b": runs["a"]}, width=32)
  with pytest.raises(ValueError, match="share no width"):
    compare.compare_runs({"a": [_run_metrics(0.5, (32,), 0)], "b": [_run_metrics(0.5, (64,), 0)]})
  for name, (metrics,) in runs.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps({"metrics": metrics}))
  assert compare.main([f"first={tmp_path / 'a'}", str(tmp_path / "b")]) == 0
  out = capsys.readouterr().out
  assert "| first | 50.0 |" in out and "| b | 80.0 |" in out
  with pytest.raises(FileNotFoundError, match="nope/results.json"):
    compare.load_runs([str(tmp_path / "nope")])

