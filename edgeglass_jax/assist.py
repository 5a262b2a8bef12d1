"""See, hear, answer: the assistant's entry point, from the command line and from Python.

  python -m edgeglass_jax.assist --workdir=DIR --image=photo.png \\
      [--audio=sound.wav] [--prompt="what color is it?" | --question-audio=question.wav] \\
      [--speak=answer.wav] [--max_new_tokens=32]

One turn (`respond`):
1. hear: a spoken question (`--question-audio`, any PCM WAV) is transcribed by Whisper tiny.en
   (`asr.transcribe`); a typed `--prompt` is used as it is;
2. see / listen and answer: the assistant trained in DIR (`tasks.assistant.load_assistant`)
   encodes the image (`--image`) and/or the sound to describe (`--audio`), prefills its prefix
   and decodes the answer;
3. speak: espeak-ng (`data.synthetic._espeak`) speaks the answer into `--speak` (16-bit PCM WAV).
   Without espeak-ng on PATH the turn still answers in text and says why it was not spoken.

Each step's latency (ASR, image encoding, audio encoding, prefill, decoding, speech, in seconds)
is in `Turn.timings` and printed by the CLI; loading the models is reported apart (`load`).
The workdir is only read.

Errors name what is wrong: `ImageError` (an image file that cannot be decoded), `AudioError`
(a sound or spoken question that is missing, unreadable, empty, or in which no words are heard),
`QuestionError` (neither or both of a typed and a spoken question), and the assistant's own
(`tasks.assistant`): `NoAssistantError` (a workdir without a trained assistant),
`QuestionTooLongError` (soft tokens + question + answer budget beyond the LM's context) and
`InputError` (e.g. a sound for an assistant trained without audio). The CLI prints any of them
as one `error: ...` line and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from edgeglass_jax.data import audio as audio_lib
from edgeglass_jax.data import sources, synthetic

SAMPLE_RATE = audio_lib.SAMPLE_RATE
SPEECH_SAMPLE_RATE = 22050  # espeak-ng's own output rate
SPEECH_VOICE, SPEECH_WPM, SPEECH_PITCH = "en-us", 165, 50
STEPS = ("asr", "image_encoding", "audio_encoding", "prefill", "decoding", "speech")
STEP_NAMES = {"asr": "ASR", "image_encoding": "image encoding", "audio_encoding": "audio encoding",
              "prefill": "prefill", "decoding": "decoding", "speech": "speech"}


class AssistError(ValueError):
  """An input of a turn is unusable; the message names the input and its file."""


class ImageError(AssistError):
  """The image cannot be decoded into RGB pixels."""


class AudioError(AssistError):
  """A sound or spoken question is missing, unreadable, empty, or holds no recognisable words."""


class QuestionError(AssistError):
  """The turn has no question (or two: typed and spoken)."""


class SpeechUnavailableError(RuntimeError):
  """The answer cannot be spoken (espeak-ng missing or failing); the message says why."""


@dataclasses.dataclass(frozen=True)
class Turn:
  """One see-hear-answer turn.

  `question` is what the assistant was asked (the typed prompt, or the transcript of the
  spoken one, then also in `transcript`); `text` its answer; `timings` seconds per step of
  `STEPS` that ran (ASR only for a spoken question, speech only when spoken); `speech_path`
  the WAV written (None when not spoken) and `speech_note` why it was not spoken;
  `wall_seconds` the whole turn by the clock (the steps plus what lies between them:
  tokenizing, detokenizing, the assistant's own bookkeeping); `num_tokens` the answer's
  generated tokens before EOS.
  """
  question: str
  text: str
  timings: Dict[str, float]
  transcript: Optional[str] = None
  speech_path: Optional[str] = None
  speech_seconds: float = 0.0
  speech_note: str = ""
  wall_seconds: float = 0.0
  num_tokens: int = 0

  @property
  def total_seconds(self) -> float:
    return float(sum(self.timings.values()))


# ----------------------------------------------------------------------------- inputs

def load_image(image: Any, what: str = "image") -> np.ndarray:
  """A path (PNG, JPEG, ... anything PIL opens) or an array -> RGB uint8 `[H, W, 3]`.

  Raises `ImageError` naming `what` and the file when it is missing or cannot be decoded.
  """
  try:
    pixels = sources.decode({"id": what, "image": image}, "image")
  except sources.DecodeError as e:
    raise ImageError(str(e)) from e
  if pixels.dtype != np.uint8:
    raise ImageError(f"{what}: expected uint8 RGB pixels, got dtype {pixels.dtype}")
  return pixels


def load_sound(sound: Any, what: str = "audio") -> np.ndarray:
  """A PCM WAV path (any rate, channels averaged) or a mono float array at 16 kHz -> float32
  `[N]` at 16 kHz. Raises `AudioError` naming `what` and the file when the file is missing or
  unreadable, or the clip is empty or holds NaN/Inf."""
  try:
    return sources.decode({"id": what, "audio": sound}, "audio", SAMPLE_RATE)
  except sources.DecodeError as e:
    raise AudioError(str(e)) from e


def _source(value: Any, what: str) -> str:
  return os.fspath(value) if isinstance(value, (str, os.PathLike)) else what


def hear(wave: np.ndarray, source: str = "question audio") -> str:
  """The words of a spoken question (`asr.transcribe`, Whisper tiny.en); `AudioError` naming
  `source` when none are heard (silence, noise)."""
  from edgeglass_jax import asr
  (text,) = asr.transcribe([wave], SAMPLE_RATE)
  if not text.strip():
    raise AudioError(f"{source}: no words heard in {len(wave) / SAMPLE_RATE:.2f} s of audio "
                     "(silent or not speech); record the question again or type it with --prompt")
  return text.strip()


# ----------------------------------------------------------------------------- speech

def speech_unavailable_reason() -> str:
  """Why answers cannot be spoken here, or "" when they can."""
  if not synthetic.espeak_available():
    return ("espeak-ng is not on PATH, so the answer is not spoken "
            "(install it: apt-get install espeak-ng)")
  return ""


def synthesize_answer(text: str) -> np.ndarray:
  """`text` spoken by espeak-ng (voice `SPEECH_VOICE`), float32 at `SPEECH_SAMPLE_RATE`.

  Calls espeak-ng every time (the uncached `_espeak`), so its latency is what a user waits.
  Raises `SpeechUnavailableError` when espeak-ng is missing or fails, or `text` is empty.
  """
  reason = speech_unavailable_reason()
  if reason:
    raise SpeechUnavailableError(reason)
  if not text.strip():
    raise SpeechUnavailableError("the answer is empty, so there is nothing to speak")
  try:
    wave = synthetic._espeak.__wrapped__(text, SPEECH_VOICE, SPEECH_WPM, SPEECH_PITCH,
                                         SPEECH_SAMPLE_RATE)
  except RuntimeError as e:
    raise SpeechUnavailableError(str(e)) from e
  if wave.size == 0:
    raise SpeechUnavailableError(f"espeak-ng produced no sound for {text!r}")
  return wave


def speak(text: str, path: str) -> float:
  """Speaks `text` into the 16-bit PCM WAV `path`; returns the seconds of audio written.
  `SpeechUnavailableError` (nothing written) when it cannot be spoken."""
  wave = synthesize_answer(text)
  audio_lib.write_wav(path, wave, SPEECH_SAMPLE_RATE)
  return wave.size / SPEECH_SAMPLE_RATE


# ----------------------------------------------------------------------------- the turn

def check_question(image: Any, audio: Any, prompt: Optional[str], spoken: Any):
  """`QuestionError` unless there is an image and/or a sound and exactly one question: a
  non-empty typed `prompt` or a `spoken` one (None marks what is absent)."""
  if (prompt is None) == (spoken is None):
    raise QuestionError("give exactly one question: a typed prompt (--prompt) or a spoken one "
                        f"(--question-audio); got {'neither' if prompt is None else 'both'}")
  if prompt is not None and not prompt.strip():
    raise QuestionError("the typed prompt is empty")
  if image is None and audio is None:
    raise QuestionError("give an image (--image) and/or a sound (--audio) to answer about")


def respond(assistant, *, image: Optional[np.ndarray] = None, audio: Optional[np.ndarray] = None,
            prompt: Optional[str] = None, question_wave: Optional[np.ndarray] = None,
            speak_to: Optional[str] = None, max_new_tokens: int = 32,
            question_source: str = "question audio") -> Turn:
  """One turn with a loaded `assistant` (`tasks.assistant.Assistant`) on decoded inputs.

  `image` RGB uint8 `[H, W, 3]`, `audio` mono float32 16 kHz (a sound to describe); exactly one
  of `prompt` (typed) and `question_wave` (spoken, 16 kHz, transcribed first). With `speak_to`
  the answer is spoken into that WAV file (unless espeak-ng is missing: `speech_note` says so).
  """
  check_question(image, audio, prompt, question_wave)
  start = time.perf_counter()
  timings: Dict[str, float] = {}
  transcript = None
  if question_wave is not None:
    t = time.perf_counter()
    transcript = hear(question_wave, question_source)
    timings["asr"] = time.perf_counter() - t
    question = transcript
  else:
    question = prompt.strip()
  answer = assistant.answer(image=image, audio=audio, prompt=question,
                            max_new_tokens=max_new_tokens)
  ran = {"image_encoding": image is not None, "audio_encoding": audio is not None,
         "prefill": True, "decoding": True}
  timings.update({step: float(answer.timings[step]) for step, on in ran.items() if on})
  speech_path, speech_seconds, note = None, 0.0, ""
  if speak_to is not None:
    t = time.perf_counter()
    try:
      speech_seconds = speak(answer.text, speak_to)
      speech_path = os.fspath(speak_to)
      timings["speech"] = time.perf_counter() - t
    except SpeechUnavailableError as e:
      note = str(e)
  return Turn(question=question, text=answer.text, timings=timings, transcript=transcript,
              speech_path=speech_path, speech_seconds=speech_seconds, speech_note=note,
              wall_seconds=time.perf_counter() - start, num_tokens=answer.num_tokens)


def ask(workdir: str, *, image: Any = None, audio: Any = None, prompt: Optional[str] = None,
        question_audio: Any = None, speak: Optional[str] = None, max_new_tokens: int = 32,
        ) -> Turn:
  """One turn from files or arrays: the Python face of `python -m edgeglass_jax.assist`.

  `image`: a path or RGB uint8 array; `audio` (a sound to describe) and `question_audio` (a
  spoken question): WAV paths or mono float32 16 kHz arrays; `prompt`: a typed question;
  `speak`: a WAV path for the spoken answer. Inputs are decoded (and refused with a named
  error) before the assistant of `workdir` is loaded; the workdir is only read.
  """
  turn, _ = ask_timed(workdir, image=image, audio=audio, prompt=prompt,
                      question_audio=question_audio, speak=speak, max_new_tokens=max_new_tokens)
  return turn


def ask_timed(workdir: str, *, image: Any = None, audio: Any = None,
              prompt: Optional[str] = None, question_audio: Any = None,
              speak: Optional[str] = None, max_new_tokens: int = 32) -> Tuple[Turn, float]:
  """`ask`, also returning the seconds spent loading the assistant (and Whisper)."""
  from edgeglass_jax.tasks import assistant as assistant_lib
  check_question(image, audio, prompt, question_audio)
  if speak is not None:
    folder = os.path.dirname(os.path.abspath(speak))
    if not os.path.isdir(folder):
      raise AssistError(f"--speak={speak}: folder {folder} does not exist")
  pixels = None if image is None else load_image(image, _source(image, "image"))
  sound = None if audio is None else load_sound(audio, _source(audio, "audio"))
  source = _source(question_audio, "question audio")
  question_wave = None if question_audio is None else load_sound(question_audio, source)
  t = time.perf_counter()
  model = assistant_lib.load_assistant(workdir)
  if question_wave is not None:
    from edgeglass_jax import asr
    asr.load()
  load_seconds = time.perf_counter() - t
  turn = respond(model, image=pixels, audio=sound, prompt=prompt, question_wave=question_wave,
                 speak_to=speak, max_new_tokens=max_new_tokens, question_source=source)
  return turn, load_seconds


def format_turn(turn: Turn, load_seconds: Optional[float] = None) -> str:
  """The CLI's report of a turn: question, answer, where it was spoken, latency per step."""
  lines = [f"question{' (heard)' if turn.transcript is not None else ''}: {turn.question}",
           f"answer: {turn.text}"]
  if turn.speech_path:
    lines.append(f"spoken answer: {turn.speech_path} ({turn.speech_seconds:.1f} s of audio)")
  elif turn.speech_note:
    lines.append(f"not spoken: {turn.speech_note}")
  lines.append("latency:")
  width = max(len(n) for n in STEP_NAMES.values())
  for step in STEPS:
    if step in turn.timings:
      lines.append(f"  {STEP_NAMES[step]:<{width}}  {turn.timings[step]:7.3f} s")
  lines.append(f"  {'total':<{width}}  {turn.total_seconds:7.3f} s")
  lines.append(f"  {'(wall clock)':<{width}}  {turn.wall_seconds:7.3f} s")
  if load_seconds is not None:
    lines.append(f"  (loading the models took {load_seconds:.2f} s more; a first call also "
                 "compiles, so later turns in one process are faster)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "Directory of a trained assistant (only read).")
  flags.DEFINE_string("image", None, "Image to look at (PNG, JPEG, ...).")
  flags.DEFINE_string("audio", None, "A sound to describe (PCM WAV).")
  flags.DEFINE_string("prompt", None, "A typed question.")
  flags.DEFINE_string("question-audio", None, "A spoken question (PCM WAV), transcribed by "
                      "Whisper.")
  flags.DEFINE_string("speak", None, "Write the spoken answer to this WAV file (espeak-ng).")
  flags.DEFINE_integer("max_new_tokens", 32, "Most answer tokens.")
  flags.mark_flags_as_required(["workdir"])
  return flags.FLAGS


def main(argv):
  from absl import app
  from edgeglass_jax.tasks import assistant as assistant_lib
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = FLAGS
  known = (AssistError, assistant_lib.NoAssistantError, assistant_lib.QuestionTooLongError,
           assistant_lib.InputError)
  try:
    turn, load_seconds = ask_timed(f.workdir, image=f.image, audio=f.audio, prompt=f.prompt,
                                   question_audio=f["question-audio"].value, speak=f.speak,
                                   max_new_tokens=f.max_new_tokens)
  except known as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_turn(turn, load_seconds))


if __name__ == "__main__":
  from absl import app as _app
  FLAGS = _define_flags()
  _app.run(main)
