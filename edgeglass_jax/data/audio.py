"""The one PCM WAV reader (stdlib `wave`): files for sources and the ASR, bytes for espeak-ng;
and its writer (16-bit PCM), for spoken answers."""
from __future__ import annotations

import io
import os
import struct
import wave
from typing import Any, Tuple

import numpy as np

SAMPLE_RATE = 16000


def read_wav(source: Any) -> Tuple[np.ndarray, int]:
  """A PCM WAV file -> `(mono float32 [N] in [-1, 1], sample rate)`.

  `source` is a path, the file's bytes or a binary file object. 8/16/24/32-bit integer PCM;
  channels are averaged. A stream whose RIFF and data sizes say "unknown" (espeak-ng
  `--stdout`) is read to its end. Raises `ValueError` naming the file when it cannot be decoded
  (`FileNotFoundError` when a path does not exist).
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    name, source = f"<{len(source)} bytes of WAV>", io.BytesIO(bytes(source))
  elif isinstance(source, (str, os.PathLike)):
    name = source = os.fspath(source)
  else:
    name = getattr(source, "name", "<WAV stream>")
  try:
    with wave.open(source, "rb") as f:
      n_channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
      raw = f.readframes(f.getnframes())
  except (wave.Error, EOFError, struct.error) as e:
    raise ValueError(f"{name}: cannot decode as PCM WAV ({e}); convert it to 16-bit PCM WAV, "
                     "e.g. `ffmpeg -i in -ar 16000 -ac 1 out.wav`") from e
  if len(raw) % (width * n_channels):
    raise ValueError(f"{name}: truncated WAV data ({len(raw)} bytes for frames of "
                     f"{n_channels} channels x {width} bytes)")
  if width == 1:
    samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
  elif width == 2:
    samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
  elif width == 3:
    b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
    samples = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8) / 8388608.0
  elif width == 4:
    samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
  else:
    raise ValueError(f"{name}: unsupported sample width of {width} bytes")
  return samples.reshape(-1, n_channels).mean(axis=1).astype(np.float32), rate


def load_audio(path: Any, sr: int = SAMPLE_RATE) -> np.ndarray:
  """`read_wav`, resampled to `sr` (polyphase, scipy) when the file's rate differs."""
  samples, rate = read_wav(path)
  if rate != sr:
    from scipy.signal import resample_poly
    g = np.gcd(rate, sr)
    samples = resample_poly(samples, sr // g, rate // g).astype(np.float32)
  return samples


def write_wav(path: Any, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
  """Writes mono float samples in [-1, 1] (clipped) to `path` as 16-bit PCM WAV; returns the
  path. `read_wav` of the file gives the samples back to within one 16-bit step."""
  samples = np.asarray(samples, np.float32)
  if samples.ndim != 1:
    raise ValueError(f"{path}: expected mono 1-D samples, got shape {samples.shape}")
  if not np.all(np.isfinite(samples)):
    raise ValueError(f"{path}: samples contain NaN or Inf")
  pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
  path = os.fspath(path)
  with wave.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(int(sample_rate))
    f.writeframes(pcm.tobytes())
  return path
