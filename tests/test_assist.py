"""`python -m edgeglass_jax.assist` and `assist.ask`: see, hear, answer, speak.

The inputs are real: a scikit-image photo saved as PNG, a question spoken by espeak-ng and
transcribed by the real Whisper tiny.en. The assistant is the tiny one of
`configs/assistant.py` (stage qa), trained once per module through `python -m edgeglass_jax.main`
as a user trains it. Every refused run leaves the workdir byte-identical (`tiny.snapshot`).
"""
import os
import re

import numpy as np
import pytest

from edgeglass_jax import assist
from edgeglass_jax.data import audio as audio_lib
from edgeglass_jax.data import synthetic
from tiny import run_main, snapshot

QUESTION = "what color is the shape"
needs_espeak = pytest.mark.skipif(not synthetic.espeak_available(),
                                  reason="needs Debian's espeak-ng (apt-get install espeak-ng)")


def words(text):
  return re.findall(r"[a-z]+", text.lower())


def spoken(text, seconds=3.0):
  """`text` spoken by espeak-ng (en-us) at 16 kHz, padded with quiet noise to `seconds`."""
  speech = synthetic._espeak(text, "en-us", 160, 50, audio_lib.SAMPLE_RATE)
  n = max(int(seconds * audio_lib.SAMPLE_RATE), speech.size + 1600)
  wave = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 1e-3
  wave[800:800 + speech.size] += 0.8 * speech / np.abs(speech).max()
  return wave


# ----------------------------------------------------------------------------- inputs (no model)

@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A real photo (scikit-image's astronaut, PNG), a sound, a spoken question, bad files."""
  skimage_data = pytest.importorskip("skimage.data")
  from PIL import Image
  d = tmp_path_factory.mktemp("inputs")
  out = {"photo": str(d / "astronaut.png"), "sound": str(d / "sound.wav"),
         "not_image": str(d / "photo.png"), "not_wav": str(d / "noise.wav"),
         "empty_wav": str(d / "empty.wav"), "silence": str(d / "silence.wav")}
  Image.fromarray(skimage_data.astronaut()).save(out["photo"])
  attrs = synthetic.Attributes("red", "circle", "large", "left")
  audio_lib.write_wav(out["sound"], synthetic.synthesize_sound(attrs, np.random.default_rng(1)))
  with open(out["not_image"], "wb") as f:
    f.write(b"this is not a PNG file at all")
  with open(out["not_wav"], "wb") as f:
    f.write(b"RIFF....WAVEnot really")
  audio_lib.write_wav(out["empty_wav"], np.zeros(0, np.float32))
  audio_lib.write_wav(out["silence"], np.zeros(3 * audio_lib.SAMPLE_RATE, np.float32))
  if synthetic.espeak_available():
    out["question"] = str(d / "question.wav")
    audio_lib.write_wav(out["question"], spoken(QUESTION))
  return out


def test_load_image_real_photo_and_named_errors(files, tmp_path):
  pixels = assist.load_image(files["photo"])
  assert pixels.shape == (512, 512, 3) and pixels.dtype == np.uint8
  for path in (files["not_image"], str(tmp_path / "missing.png")):
    with pytest.raises(assist.ImageError, match=re.escape(path)):
      assist.load_image(path, path)
  with pytest.raises(assist.ImageError, match="image"):
    assist.load_image(np.zeros((4, 4, 3), np.float32))


def test_load_sound_and_named_errors(files, tmp_path):
  wave = assist.load_sound(files["sound"])
  assert wave.dtype == np.float32 and wave.size == audio_lib.SAMPLE_RATE
  for key in ("not_wav", "empty_wav"):
    with pytest.raises(assist.AudioError, match=re.escape(files[key])):
      assist.load_sound(files[key], files[key])
  missing = str(tmp_path / "missing.wav")
  with pytest.raises(assist.AudioError, match=re.escape(missing)):
    assist.load_sound(missing, missing)


def test_write_wav_round_trip(tmp_path):
  wave = np.sin(np.linspace(0, 200, 8000)).astype(np.float32) * 0.5
  path = audio_lib.write_wav(tmp_path / "x.wav", wave, 22050)
  back, rate = audio_lib.read_wav(path)
  assert rate == 22050 and np.max(np.abs(back - wave)) <= 1 / 32767
  with pytest.raises(ValueError, match="mono"):
    audio_lib.write_wav(tmp_path / "y.wav", np.zeros((2, 3)), 16000)


def test_silent_question_is_named_error(files):
  wave = assist.load_sound(files["silence"])
  with pytest.raises(assist.AudioError, match="silence.wav: no words heard"):
    assist.hear(wave, files["silence"])


def test_check_question():
  image, wave = np.zeros((4, 4, 3), np.uint8), np.zeros(16, np.float32)
  with pytest.raises(assist.QuestionError, match="neither"):
    assist.check_question(image, None, None, None)
  with pytest.raises(assist.QuestionError, match="both"):
    assist.check_question(image, None, "what?", wave)
  with pytest.raises(assist.QuestionError, match="empty"):
    assist.check_question(image, None, "  ", None)
  with pytest.raises(assist.QuestionError, match="image"):
    assist.check_question(None, None, "what?", None)
  assist.check_question(None, wave, None, wave)


@needs_espeak
def test_speak_writes_the_answer_whisper_hears(tmp_path):
  from edgeglass_jax import asr
  path = str(tmp_path / "answer.wav")
  seconds = assist.speak("a large red circle on the left", path)
  wave, rate = audio_lib.read_wav(path)
  assert rate == assist.SPEECH_SAMPLE_RATE and abs(wave.size / rate - seconds) < 1e-6
  assert 0.8 < seconds < 5
  heard = words(asr.transcribe([wave], rate)[0])
  assert {"red", "circle", "left"} <= set(heard), heard


def test_speak_without_espeak_says_why(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))
  assert "espeak-ng is not on PATH" in assist.speech_unavailable_reason()
  with pytest.raises(assist.SpeechUnavailableError, match="espeak-ng is not on PATH"):
    assist.speak("hello", str(tmp_path / "a.wav"))
  assert not os.path.exists(tmp_path / "a.wav")


# ----------------------------------------------------------------------------- with an assistant

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The tiny assistant (random encoders and 2-layer LM of `configs/assistant.py:qa,tiny`,
  with its default sink token in front), trained once through the CLI as a user trains it; its answers
  are words, not good ones."""
  d = str(tmp_path_factory.mktemp("assistant"))
  proc = run_main("--config=configs/assistant.py:qa,tiny", f"--workdir={d}",
                  "--config.train.steps=150", timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return d


@pytest.fixture(scope="module")
def context_length(workdir):
  from edgeglass_jax.tasks import assistant as assistant_lib
  return int(assistant_lib.load_assistant(workdir).context_length)


def run_assist(*args, **kwargs):
  return run_main(*args, module="edgeglass_jax.assist", timeout=900, **kwargs)


LATENCY = re.compile(r"^\s+(ASR|image encoding|audio encoding|prefill|decoding|speech|total)"
                     r"\s+(\d+\.\d+) s$", re.M)


def latencies(stdout):
  return {name: float(v) for name, v in LATENCY.findall(stdout)}


@needs_espeak
def test_cli_spoken_question_on_a_real_photo_writes_spoken_answer(workdir, files, tmp_path):
  from edgeglass_jax import asr
  before = snapshot(workdir)
  out_wav = str(tmp_path / "answer.wav")
  proc = run_assist(f"--workdir={workdir}", f"--image={files['photo']}",
                    f"--question-audio={files['question']}", f"--speak={out_wav}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  heard = re.search(r"^question \(heard\): (.*)$", proc.stdout, re.M)
  assert heard and {"color", "shape"} <= set(words(heard.group(1))), proc.stdout
  answer = re.search(r"^answer: (.*)$", proc.stdout, re.M).group(1)
  steps = latencies(proc.stdout)
  assert set(steps) == {"ASR", "image encoding", "prefill", "decoding", "speech", "total"}, \
      proc.stdout
  assert all(v >= 0 for v in steps.values()) and steps["ASR"] > 0 and steps["speech"] > 0
  assert steps["total"] == pytest.approx(sum(v for k, v in steps.items() if k != "total"),
                                         abs=0.01)
  assert f"spoken answer: {out_wav}" in proc.stdout
  wave, rate = audio_lib.read_wav(out_wav)
  assert rate == assist.SPEECH_SAMPLE_RATE and wave.size > 0.2 * rate
  answer_words = set(words(answer))
  heard_back = set(words(asr.transcribe([wave], rate)[0]))
  assert answer_words and len(answer_words & heard_back) >= len(answer_words) / 2, \
      (answer, heard_back)
  assert snapshot(workdir) == before


def test_python_typed_prompt_with_a_sound_and_an_image(workdir, files, tmp_path):
  before = snapshot(workdir)
  turn = assist.ask(workdir, image=files["photo"], audio=files["sound"],
                    prompt="what color is the sound?", max_new_tokens=8)
  assert isinstance(turn.text, str) and turn.transcript is None
  assert turn.question == "what color is the sound?"
  assert set(turn.timings) == {"image_encoding", "audio_encoding", "prefill", "decoding"}
  assert turn.speech_path is None and turn.speech_note == ""
  # The word-level codec gives a token a word (and special tokens none): the tokens before EOS.
  assert len(turn.text.split()) <= turn.num_tokens <= 8
  again = assist.ask(workdir, audio=assist.load_sound(files["sound"]),
                     prompt="what color is the sound?", max_new_tokens=8)
  assert set(again.timings) == {"audio_encoding", "prefill", "decoding"}
  assert snapshot(workdir) == before


def test_cli_typed_prompt_with_audio_without_espeak_answers_in_text(workdir, files, tmp_path):
  """PATH without espeak-ng: the answer comes in text and the command says why it is not
  spoken; no WAV is written."""
  before = snapshot(workdir)
  out_wav = str(tmp_path / "answer.wav")
  empty_bin = tmp_path / "bin"
  empty_bin.mkdir()
  proc = run_assist(f"--workdir={workdir}", f"--image={files['photo']}",
                    f"--audio={files['sound']}", "--prompt=describe the sound",
                    f"--speak={out_wav}", env={"PATH": str(empty_bin)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"^answer: ", proc.stdout, re.M), proc.stdout
  assert "not spoken: espeak-ng is not on PATH" in proc.stdout
  assert set(latencies(proc.stdout)) == {"image encoding", "audio encoding", "prefill",
                                         "decoding", "total"}
  assert not os.path.exists(out_wav)
  assert snapshot(workdir) == before


@pytest.mark.parametrize("case", ["bad_image", "missing_image", "unreadable_audio",
                                  "empty_audio", "silent_question", "no_assistant",
                                  "too_long", "no_question", "speak_folder"])
def test_cli_named_errors_leave_workdir_unchanged(case, workdir, files, tmp_path,
                                                  context_length):
  target = workdir
  args = [f"--image={files['photo']}", "--prompt=what shape is it?"]
  expect = None
  if case == "bad_image":
    args[0], expect = f"--image={files['not_image']}", files["not_image"]
  elif case == "missing_image":
    missing = str(tmp_path / "nope.jpg")
    args[0], expect = f"--image={missing}", missing
  elif case == "unreadable_audio":
    args.append(f"--audio={files['not_wav']}")
    expect = files["not_wav"]
  elif case == "empty_audio":
    args.append(f"--audio={files['empty_wav']}")
    expect = files["empty_wav"]
  elif case == "silent_question":
    args[1] = f"--question-audio={files['silence']}"
    expect = files["silence"] + ": no words heard"
  elif case == "no_assistant":
    target = str(tmp_path / "not_trained")
    os.makedirs(target)
    with open(os.path.join(target, "results.json"), "w") as f:
      f.write('{"task": "align", "step": 3, "metrics": {}}')
    expect = target
  elif case == "too_long":
    args[1] = "--prompt=" + " ".join(["color"] * (context_length + 1))
    expect = str(context_length)
  elif case == "no_question":
    args.pop()
    expect = "neither"
  elif case == "speak_folder":
    missing = str(tmp_path / "no" / "such")
    args.append(f"--speak={missing}/answer.wav")
    expect = missing
  before = snapshot(target)
  proc = run_assist(f"--workdir={target}", *args)
  assert proc.returncode == 2, (proc.stdout, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert error and expect in error[0], proc.stderr[-3000:]
  assert snapshot(target) == before


def test_soft_token_views_are_the_bridge_output_of_each_modality_alone(workdir):
  """`soft_first` / `soft_mean` of a modality are its first soft token and the mean of its
  soft tokens, from the bridge applied to that modality's rows alone (checked against the
  bridge applied by hand with the other modality's tokens zeroed and its slots cut off)."""
  import jax.numpy as jnp
  from edgeglass_jax import features
  from edgeglass_jax.tasks import assistant as assistant_lib
  _, feature_dir, model, _, trainable = assistant_lib._exported_model(workdir)
  split = features.load_split(os.path.join(feature_dir, "test"))
  split = {k: (v[:5] if k != "index" else v) for k, v in split.items()}
  image_slots = None
  for m in ("image", "audio"):
    views = assistant_lib.soft_token_views(model, trainable["bridge"], split, m, batch_size=2)
    batch = {}
    for mm in ("image", "audio"):
      batch[f"{mm}/tokens"] = jnp.asarray(split[f"{mm}/tokens"], jnp.float32)
      batch[f"{mm}/token_mask"] = jnp.asarray(split[f"{mm}/token_mask"], bool)
      batch[f"{mm}/valid"] = jnp.full((5,), True)
    soft, mask = (np.asarray(a) for a in model.bridge.apply(trainable["bridge"], batch))
    if image_slots is None:  # the slots that the image alone fills
      image_slots = np.asarray(model.bridge.apply(trainable["bridge"], dict(
          batch, **{"audio/valid": jnp.full((5,), False)}))[1]).any(0)
    own = image_slots if m == "image" else ~image_slots
    soft, mask = soft[:, own], mask[:, own]
    assert mask.any(1).all()
    first = soft[np.arange(5), mask.argmax(1)]
    mean = (soft * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(views["soft_first"], first, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(views["soft_mean"], mean, rtol=1e-5, atol=1e-5)


def test_probe_prints_what_the_soft_tokens_hold_and_the_residual_norms(workdir, tmp_path):
  proc = run_main(f"--assistant={workdir}", "--count=4", module="edgeglass_jax.probe",
                  timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  probes, norms = proc.stdout.strip().split("\n\n")
  _, header, *rows = probes.splitlines()
  assert header.split() == ["modality/view", "color", "shape", "size", "position"]
  names = [r.split()[0] for r in rows]
  for m in ("image", "audio"):
    for v in ("first", "mean", "soft_first", "soft_mean", "majority", "answers"):
      assert f"{m}/{v}" in names, names
  assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r.split()[1:])
  _, header, *rows = norms.splitlines()
  for column in ("image/sink/max", "image/soft/median", "audio/soft/max", "audio/text/median"):
    assert column in header
  assert [r.split()[0] for r in rows] == ["0", "1"]  # the tiny LM's 2 blocks
  assert all(float(v) > 0 for r in rows for v in r.split()[1:])
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  proc = run_main(f"--assistant={empty}", module="edgeglass_jax.probe", timeout=300)
  assert proc.returncode == 2 and f"error: {empty} holds no trained assistant" in proc.stderr
