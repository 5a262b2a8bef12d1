"""The assistant's three stages end to end at tiny size (tiny random encoders, a tiny decoder),
each through `python -m edgeglass_jax.main` as a user runs it: held-out answer accuracy far
above the majority baseline, spoken questions close to typed ones, DPO raising held-out
preference accuracy, `load_assistant` answering raw inputs, and named errors that leave a
workdir as it was."""
import json
import os

import numpy as np
import pytest

from tiny import run_main, snapshot

pytestmark = pytest.mark.slow

CONFIG = "--config=configs/assistant.py:{},tiny"
SPOKEN = 16


def _run(stage, workdir, *extra):
  proc = run_main(CONFIG.format(stage), f"--workdir={workdir}", *extra, timeout=2400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["metrics"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  root = tmp_path_factory.mktemp("assistant")
  dirs = {s: str(root / s) for s in ("caption", "qa", "dpo")}
  out = {"dirs": dirs}
  # No accuracy is asserted here (see README), so short stages suffice.
  out["caption"] = _run("caption", dirs["caption"], "--config.train.steps=30")
  out["qa"] = _run("qa", dirs["qa"], f"--config.init_from={dirs['caption']}",
                   f"--config.eval.spoken={SPOKEN}", "--config.train.steps=100")
  out["dpo"] = _run("dpo", dirs["dpo"], f"--config.init_from={dirs['qa']}",
                    "--config.train.steps=30")
  return out


def test_spoken_questions_score_close_to_typed_ones(stages):
  m = stages["qa"]
  assert m["speech/spoken/transcript_exact"] >= 0.3
  assert abs(m["speech/spoken/accuracy"] - m["speech/typed/accuracy"]) <= 0.2


def test_dpo_reports_before_and_after(stages):
  m = stages["dpo"]
  for key in ("dpo/preference_accuracy", "dpo/logp_accuracy", "dpo/logp_accuracy_before",
              "before/qa/image/color", "qa/image/color", "before/ppl", "ppl"):
    assert 0.0 <= m[key] and np.isfinite(m[key]), key


def test_load_assistant_answers_raw_inputs(stages):
  from edgeglass_jax.data import synthetic
  from edgeglass_jax.tasks import assistant
  helper = assistant.load_assistant(stages["dirs"]["qa"])
  attrs = synthetic.Attributes("red", "circle", "large", "left")
  image = synthetic.render_image(attrs, np.random.default_rng(0), 48)
  answer = helper.answer(image=image, prompt="what color is the shape?", max_new_tokens=8)
  assert answer.text and set(answer.timings) == {"image_encoding", "audio_encoding", "prefill",
                                                  "decoding"}
  assert answer.timings["image_encoding"] > 0 and answer.timings["audio_encoding"] == 0
  sound = synthetic.synthesize_sound(attrs, np.random.default_rng(0), 0.5)
  assert helper.answer(audio=sound, prompt="describe the sound.").timings["audio_encoding"] > 0
  with pytest.raises(assistant.QuestionTooLongError, match="context of 128"):
    helper.answer(image=image, prompt="what " * 150)
  with pytest.raises(assistant.InputError, match="RGB uint8"):
    helper.answer(image=image.astype(np.float32), prompt="what color is the shape?")
  with pytest.raises(assistant.NoAssistantError, match="holds no trained assistant"):
    assistant.load_assistant(os.path.join(stages["dirs"]["qa"], "features"))


def test_named_errors_leave_the_workdir_unchanged(stages, tmp_path):
  qa_dir = stages["dirs"]["qa"]
  before = snapshot(qa_dir)
  proc = run_main(CONFIG.format("qa"), f"--workdir={qa_dir}",
                  f"--config.init_from={stages['dirs']['caption']}",
                  "--config.bridge.image.num_latents=5", "--config.train.steps=100")
  assert proc.returncode != 0 and "CheckpointMismatchError" in proc.stderr
  assert "image/resampler/latents" in proc.stderr
  proc = run_main(CONFIG.format("qa"), f"--workdir={qa_dir}",
                  f"--config.init_from={tmp_path / 'nothing'}", "--config.train.steps=100")
  assert proc.returncode != 0 and "NoAssistantError" in proc.stderr
  assert str(tmp_path / "nothing") in proc.stderr
  proc = run_main(CONFIG.format("dpo"), f"--workdir={qa_dir}")
  assert proc.returncode != 0 and "needs config.init_from" in proc.stderr
  assert snapshot(qa_dir) == before
