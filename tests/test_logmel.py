"""Whisper log-mel frontend vs transformers' WhisperFeatureExtractor, and WAV loading."""
import glob
import wave

import jax
import numpy as np
import pytest
import transformers
from transformers.audio_utils import mel_filter_bank

from edgeglass_jax.encoders import whisper

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
TOL = 1e-4  # HF runs torch.stft in float32 too; the two agree to ~3e-5


@pytest.fixture(scope="module")
def real_clips():
  files = sorted(glob.glob(f"{LIBRIVOX}/*.wav"))
  if not files:
    pytest.skip("Debian package pocketsphinx-testdata (LibriVox WAV clips) is not installed")
  return [whisper.load_audio(f) for f in files]


def synthetic(seconds, seed):
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * whisper.SAMPLE_RATE)) / whisper.SAMPLE_RATE
  chirp = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2
  return (chirp + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def hf_features(audio, n_mels, **kw):
  fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
  out = fe(audio, sampling_rate=16000, return_tensors="np", **kw)
  return out["input_features"].transpose(0, 2, 1), out.get("attention_mask")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers(n_mels):
  ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                        max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                        mel_scale="slaney")
  np.testing.assert_allclose(whisper.mel_filters(n_mels), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_real_speech_short_and_long(real_clips, n_mels):
  short = real_clips[0]
  long = np.concatenate(real_clips + real_clips)  # ~48 s: trimmed to 30 s
  assert len(short) < whisper.CHUNK_SAMPLES < len(long)
  for audio in (short, long):
    ours = np.asarray(whisper.log_mel_spectrogram(audio, n_mels))
    ref, _ = hf_features(audio, n_mels)
    assert ours.shape == ref.shape == (1, 3000, n_mels)
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize("n_mels", [80, 128])
def test_synthetic_short_and_long(n_mels):
  for seconds, seed in ((2.5, 0), (31.0, 1)):
    audio = synthetic(seconds, seed)
    ours = np.asarray(whisper.log_mel_spectrogram(audio, n_mels))
    ref, _ = hf_features(audio, n_mels)
    assert np.abs(ours - ref).max() < TOL, f"{seconds} s"
    assert ref.std() > 0.1  # not a degenerate, all-floor spectrogram


def test_batch_with_lengths_matches_hf_mask_and_features():
  clips = [synthetic(3.01, 2), synthetic(0.5, 3), synthetic(33.0, 4)]
  mel, mask = whisper.log_mel_from_waveforms(clips, n_mels=80)
  ref, ref_mask = hf_features(clips, 80, return_attention_mask=True)
  assert mel.shape == (3, 3000, 80) and mask.dtype == bool
  np.testing.assert_array_equal(mask, ref_mask.astype(bool))
  assert mask.sum(1).tolist() == [301, 50, 3000]
  assert np.abs(mel - ref).max() < TOL


def test_jit_and_junk_past_lengths():
  """Inside jit, samples past `lengths` are ignored, like HF's zero padding."""
  clip = synthetic(1.0, 5)
  padded = np.concatenate([clip, np.random.default_rng(6).normal(size=8000).astype(np.float32)])
  fn = jax.jit(lambda a, n: whisper.log_mel_spectrogram(a, 80, n))
  mel, mask = fn(padded[None], np.array([len(clip)]))
  ref, _ = hf_features(clip, 80)
  assert np.abs(np.asarray(mel) - ref).max() < TOL
  assert int(mask.sum()) == 100
  plain = whisper.log_mel_spectrogram(padded, 80)
  assert np.abs(np.asarray(plain) - ref).max() > 0.1


def write_wav(path, frames, rate, width, channels=2):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(channels)
    f.setsampwidth(width)
    f.setframerate(rate)
    f.writeframes(frames.tobytes())


def test_load_audio_formats_and_resampling(tmp_path):
  t = np.arange(8000) / 8000.0
  mono = 0.5 * np.sin(2 * np.pi * 100 * t)
  stereo = np.stack([mono + 0.1, mono - 0.1], axis=1)
  write_wav(tmp_path / "s16.wav", np.round(stereo * 32767).astype("<i2"), 8000, 2)
  pcm24 = np.round(stereo * (2**23 - 1)).astype("<i4").view(np.uint8).reshape(-1, 2, 4)[..., :3]
  write_wav(tmp_path / "s24.wav", np.ascontiguousarray(pcm24).reshape(-1, 6), 16000, 3)

  up = whisper.load_audio(tmp_path / "s16.wav")
  assert up.dtype == np.float32 and up.shape == (16000,)
  np.testing.assert_allclose(up[1000:15000:2], mono[500:7500], atol=2e-3)  # 2x upsampled
  same = whisper.load_audio(tmp_path / "s24.wav")
  assert same.shape == (8000,)
  np.testing.assert_allclose(same, mono, atol=1e-6)


def test_load_audio_errors_name_the_file(tmp_path):
  bad = tmp_path / "not_audio.wav"
  bad.write_bytes(b"definitely not RIFF data")
  with pytest.raises(ValueError, match="not_audio.wav"):
    whisper.load_audio(bad)
  with pytest.raises(FileNotFoundError, match="missing.wav"):
    whisper.load_audio(tmp_path / "missing.wav")


def test_real_clip_loads(real_clips):
  with wave.open(sorted(glob.glob(f"{LIBRIVOX}/*.wav"))[0]) as f:
    n = f.getnframes()
  assert real_clips[0].shape == (n,) and 0.05 < np.abs(real_clips[0]).max() <= 1.0
