"""The one WAV reader (`data.audio`) and the one safetensors header parser (`weights.hf`)."""
import io
import wave

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgeglass_jax.data import audio, pipeline
from edgeglass_jax.encoders import whisper
from edgeglass_jax.weights import hf


def wav_bytes(pcm16: np.ndarray, rate: int, channels: int = 1) -> bytes:
  buf = io.BytesIO()
  with wave.open(buf, "wb") as f:
    f.setnchannels(channels)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(pcm16.astype("<i2").tobytes())
  return buf.getvalue()


def test_wav_from_path_bytes_stream_and_unknown_sizes(tmp_path):
  pcm = (np.sin(np.arange(2205) / 7.0) * 20000).astype("<i2")
  data = wav_bytes(pcm, 22050)
  (tmp_path / "a.wav").write_bytes(data)
  want = pcm.astype(np.float32) / 32768.0
  for source in (tmp_path / "a.wav", str(tmp_path / "a.wav"), data, io.BytesIO(data)):
    got, rate = audio.read_wav(source)
    assert rate == 22050 and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
  # espeak-ng --stdout writes "unknown" (huge) RIFF and data sizes: read to the end instead
  streamed = bytearray(data)
  streamed[4:8] = (0x7FFFF024).to_bytes(4, "little")
  streamed[40:44] = (0x7FFFF000).to_bytes(4, "little")
  np.testing.assert_array_equal(audio.read_wav(bytes(streamed))[0], want)
  np.testing.assert_array_equal(whisper.load_audio(tmp_path / "a.wav", 22050), want)
  assert whisper.load_audio is audio.load_audio


def test_wav_errors_name_the_source(tmp_path):
  with pytest.raises(ValueError, match="bytes of WAV.*cannot decode as PCM WAV"):
    audio.read_wav(b"RIFF....not a wave file")
  stereo = wav_bytes(np.zeros(10, "<i2"), 8000, channels=2)
  (tmp_path / "cut.wav").write_bytes(stereo[:-2])
  with pytest.raises(ValueError, match="cut.wav: truncated WAV data"):
    audio.read_wav(tmp_path / "cut.wav")
  with pytest.raises(FileNotFoundError, match="missing.wav"):
    audio.read_wav(tmp_path / "missing.wav")


def test_safetensors_views_equal_the_library(tmp_path):
  tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int64),
             "c": np.array([[True, False]]), "d": np.zeros((0, 5), np.float16)}
  path = str(tmp_path / "x.safetensors")
  save_file(tensors, path, metadata={"format": "np"})
  header, offset = hf.safetensors_header(path)
  assert set(header) == {"__metadata__", "a", "b", "c", "d"} and offset > 8
  views = hf.memmap_safetensors(path)
  ref = load_file(path)
  assert views.keys() == ref.keys()
  for k in ref:
    assert views[k].dtype == ref[k].dtype and not views[k].flags.writeable
    np.testing.assert_array_equal(views[k], ref[k])
  assert list(hf.memmap_safetensors(path, ["b"])) == ["b"]
  with pytest.raises(KeyError, match="no tensor 'z'"):
    hf.memmap_safetensors(path, ["z"])


def test_safetensors_bf16_widens_to_float32(tmp_path):
  import torch
  from safetensors.torch import save_file as save_torch
  x = torch.linspace(-3, 3, 10, dtype=torch.bfloat16).reshape(2, 5)
  path = str(tmp_path / "bf16.safetensors")
  save_torch({"w": x, "i": torch.arange(3)}, path)
  assert hf.memmap_safetensors(path)["w"].dtype == ml_dtypes.bfloat16
  out = hf._load_safetensors_bf16(path)  # the path taken when safetensors lacks bf16 numpy
  assert out["w"].dtype == np.float32
  np.testing.assert_array_equal(out["w"], x.float().numpy())
  np.testing.assert_array_equal(out["i"], [0, 1, 2])


def test_damaged_safetensors_errors_name_the_file(tmp_path):
  path = tmp_path / "shard-00000.safetensors"
  save_file({"a": np.ones((64, 64), np.float32)}, str(path))
  data = path.read_bytes()
  path.write_bytes(data[:4])
  with pytest.raises(hf.WeightsError, match="shard-00000.safetensors: unreadable safetensors"):
    hf.safetensors_header(str(path))
  with pytest.raises(IOError, match="feature shard .*shard-00000.safetensors.*rerun extraction"):
    pipeline._mmap_safetensors(str(path), ["a"])
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(hf.WeightsError, match="tensor 'a' ends at byte .* past the file"):
    hf.memmap_safetensors(str(path))
