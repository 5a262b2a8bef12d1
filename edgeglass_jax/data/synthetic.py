"""The embedded default dataset: procedural shapes seen, heard and described.

Every example is drawn from an attribute tuple `Attributes(color, shape, size, position)`
(8 x 6 x 2 x 3 = 288 tuples); its integer `group` id names the tuple, and examples sharing a
group are positives of each other for retrieval. Each example has three views of the tuple:

- image: the shape drawn on a noisy gradient background, RGB uint8 `[H, W, 3]`, with jittered
  position, size, rotation and colour;
- text: captions from varied templates and synonyms ("there is a tiny crimson disc at the left
  side"), `captions_per_item` of them, caption k drawn deterministically from (example, k);
- audio: 16 kHz mono float32 `[S]`, either `"sound"` (a synthesised tone: pitch <- colour,
  timbre <- shape, loudness <- size, onset time <- position) or `"speech"` (a caption spoken by
  Debian's `espeak-ng`, resampled to 16 kHz);
- depth (with `SyntheticConfig(depth=True)`): a range image of the same scene, float32 `[H, W]`
  metres, the shape as a height field in front of a far plane (`data/depth.py`).

Splits and held-out combinations: a deterministic subset of tuples (`heldout_fraction`, ~15%,
balanced so every attribute value keeps most of its tuples in training) never appears in
`train`. Splits listed in `heldout_splits` (default `("test",)`) draw only held-out tuples, the
others only seen tuples, so the test split measures compositional generalisation: each colour,
shape, size and position is known from training, the combination is not.

Everything is a pure function of `(seed, split, index)`: each modality has its own random stream,
so changing the image size does not change captions or audio. Access is random (`source(split)`
returns an object with `__len__`/`__getitem__`, usable as a grain RandomAccessDataSource), and an
example costs 1-3 ms at 64x64 (speech: one espeak-ng call, ~40 ms, cached per utterance).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import re
import shutil
import subprocess
import warnings
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from edgeglass_jax.data.audio import read_wav

COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
ATTRIBUTE_NAMES = ("color", "shape", "size", "position")
VOCAB: Dict[str, Tuple[str, ...]] = dict(zip(ATTRIBUTE_NAMES, (COLORS, SHAPES, SIZES, POSITIONS)))
NUM_GROUPS = len(COLORS) * len(SHAPES) * len(SIZES) * len(POSITIONS)
SPLITS = ("train", "val", "test")
AUDIO_MODES = ("sound", "speech")

COLOR_RGB = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30),
    "green": (40, 180, 50), "cyan": (30, 200, 210), "blue": (30, 60, 225),
    "purple": (135, 40, 190), "pink": (245, 120, 180),
}
# Fundamental of the tone per colour: minor thirds upward from A3 (220 Hz .. 740 Hz).
COLOR_PITCH_HZ = {c: 220.0 * 2.0 ** (3 * k / 12) for k, c in enumerate(COLORS)}
SIZE_RADIUS = {"small": (0.08, 0.10), "large": (0.15, 0.18)}  # fraction of the image side
SIZE_RMS = {"small": 0.05, "large": 0.16}  # tone loudness, ~10 dB apart
POSITION_X = {"left": 0.24, "center": 0.5, "right": 0.76}  # fraction of the image width
POSITION_ONSET = {"left": 0.05, "center": 0.35, "right": 0.65}  # fraction of the clip

COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"), "green": ("green", "emerald", "grass green"),
    "cyan": ("cyan", "turquoise", "aqua"), "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "plum"), "pink": ("pink", "rose", "fuchsia"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round dot"), "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape", "triangular shape"),
    "star": ("star", "five-pointed star", "star shape"),
    "cross": ("cross", "plus sign", "plus shape"), "ring": ("ring", "hoop", "donut"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
POSITION_WORDS = {
    "left": ("on the left", "at the left side", "to the left", "in the left part of the picture"),
    "center": ("in the center", "in the middle", "at the centre", "in the middle of the picture"),
    "right": ("on the right", "at the right side", "to the right",
              "in the right part of the picture"),
}
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {pos}",
    "there is a {size} {color} {shape} {pos}",
    "{pos}, a {size} {color} {shape}",
    "a {color} {shape}, {size}, {pos}",
    "the picture shows a {size} {color} {shape} {pos}",
    "a {size} {shape} colored {color}, placed {pos}",
    "{size} and {color}: a {shape} {pos}",
    "a {shape} {pos}; it is {size} and {color}",
)
PROMPT_TEMPLATES = {
    "color": "a photo of a {} shape",
    "shape": "a photo of a {}",
    "size": "a photo of a {} shape",
    "position": "a photo of a shape {}",
}
ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f2", "en-gb+m3", "en-us+f4", "en-gb-scotland",
                 "en-us+m5")
ESPEAK_MAX_RATE = 450  # words per minute

_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
(_STREAM_HELDOUT, _STREAM_ASSIGN, _STREAM_IMAGE, _STREAM_AUDIO, _STREAM_TEXT,
 _STREAM_DEPTH) = range(6)
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


class Attributes(NamedTuple):
  """One attribute tuple; its values come from `VOCAB`."""
  color: str
  shape: str
  size: str
  position: str


def _canonical_attribute(attribute: str) -> str:
  name = "color" if attribute == "colour" else attribute
  if name not in VOCAB:
    raise KeyError(f"unknown attribute {attribute!r}; known: {ATTRIBUTE_NAMES}")
  return name


def group_of(attrs: Attributes) -> int:
  """Mixed-radix id in [0, NUM_GROUPS) of an attribute tuple."""
  group = 0
  for name, value in zip(ATTRIBUTE_NAMES, attrs):
    values = VOCAB[name]
    if value not in values:
      raise ValueError(f"attribute {name}={value!r} is not one of {values}")
    group = group * len(values) + values.index(value)
  return group


def attributes_of(group: int) -> Attributes:
  """Inverse of `group_of`."""
  if not 0 <= int(group) < NUM_GROUPS:
    raise ValueError(f"group {group} is outside [0, {NUM_GROUPS})")
  group, out = int(group), []
  for name in reversed(ATTRIBUTE_NAMES):
    group, k = divmod(group, len(VOCAB[name]))
    out.append(VOCAB[name][k])
  return Attributes(*reversed(out))


def prompts_for(attribute: str, template: Optional[str] = None) -> List[str]:
  """Zero-shot class prompts, one per value of `attribute` in `VOCAB` order.

  `template` has one `{}` slot (default e.g. "a photo of a {} shape"); positions fill it with
  their phrase ("on the left"). Label k of an example is `VOCAB[attribute].index(value)`.
  """
  name = _canonical_attribute(attribute)
  template = template or PROMPT_TEMPLATES[name]
  if "{}" not in template:
    raise ValueError(f"prompt template {template!r} needs a '{{}}' slot")
  words = [POSITION_WORDS[v][0] if name == "position" else v for v in VOCAB[name]]
  return [_ARTICLE.sub(r"\1n ", template.format(w)) for w in words]


def zero_shot_labels(groups: np.ndarray) -> Dict[str, np.ndarray]:
  """Per-attribute class indices `{attribute: int [N]}` of examples with group ids `groups [N]`,
  in the class order of `prompts_for`."""
  attrs = [attributes_of(g) for g in np.asarray(groups).reshape(-1)]
  return {name: np.array([VOCAB[name].index(a[i]) for a in attrs], np.int32)
          for i, name in enumerate(ATTRIBUTE_NAMES)}


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


def caption(attrs: Attributes, rng: np.random.Generator, template: Optional[int] = None) -> str:
  """One caption of `attrs`: a template (`template` index or drawn) filled with drawn synonyms."""
  if template is None:
    template = int(rng.integers(len(CAPTION_TEMPLATES)))
  pick = lambda words: words[int(rng.integers(len(words)))]
  text = CAPTION_TEMPLATES[template].format(
      size=pick(SIZE_WORDS[attrs.size]), color=pick(COLOR_WORDS[attrs.color]),
      shape=pick(SHAPE_WORDS[attrs.shape]), pos=pick(POSITION_WORDS[attrs.position]))
  return _ARTICLE.sub(r"\1n ", text)


def _shape_polygons(shape: str, r: float) -> Tuple[List[np.ndarray], List[np.ndarray]]:
  """Filled polygons and holes (`[N, 2]` vertex arrays around the origin, y down) of a shape."""
  if shape == "circle":
    a = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    return [r * np.stack([np.cos(a), np.sin(a)], -1)], []
  if shape == "ring":
    a = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    unit = np.stack([np.cos(a), np.sin(a)], -1)
    return [1.05 * r * unit], [0.55 * r * unit]
  if shape == "square":
    h = 0.85 * r
    return [np.array([[-h, -h], [h, -h], [h, h], [-h, h]])], []
  if shape == "triangle":
    a = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
    return [1.2 * r * np.stack([np.cos(a), np.sin(a)], -1) + [0.0, 0.2 * r]], []
  if shape == "star":
    a = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    rad = 1.15 * r * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return [rad[:, None] * np.stack([np.cos(a), np.sin(a)], -1)], []
  if shape == "cross":
    w, h = 0.32 * r, 1.0 * r
    return [np.array([[-w, -h], [w, -h], [w, -w], [h, -w], [h, w], [w, w], [w, h], [-w, h],
                      [-w, w], [-h, w], [-h, -w], [-w, -w]])], []
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_alpha(attrs: Attributes, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
  """Anti-aliased coverage of the shape, float32 `[H, W, 1]` in [0, 1], with jittered
  placement, size and rotation: the first draws of an image's stream, shared by every view."""
  side = int(image_size)
  ss = max(1, math.ceil(256 / side))  # supersampling factor for anti-aliased edges
  big = side * ss
  lo, hi = SIZE_RADIUS[attrs.size]
  r = rng.uniform(lo, hi) * big
  cx = (POSITION_X[attrs.position] + rng.uniform(-0.03, 0.03)) * big
  cy = (0.5 + rng.uniform(-0.1, 0.1)) * big
  theta = np.deg2rad(rng.uniform(-15.0, 15.0))
  rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
  fills, holes = _shape_polygons(attrs.shape, r)
  mask = Image.new("L", (big, big), 0)
  draw = ImageDraw.Draw(mask)
  for poly, value in [(p, 255) for p in fills] + [(p, 0) for p in holes]:
    pts = poly @ rot + [cx, cy]
    draw.polygon([tuple(p) for p in pts.tolist()], fill=value)
  if ss > 1:
    mask = mask.resize((side, side), Image.BOX)
  return np.asarray(mask, np.float32)[..., None] / 255.0


def render_image(attrs: Attributes, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
  """Draws `attrs` as RGB uint8 `[H, W, 3]` with jittered placement, size, rotation and colour."""
  side = int(image_size)
  alpha = shape_alpha(attrs, rng, side)
  top, bottom = rng.uniform(25.0, 100.0, size=2)
  tint = rng.uniform(-10.0, 10.0, size=3).astype(np.float32)
  ramp = np.linspace(top, bottom, side, dtype=np.float32)[:, None, None]
  background = ramp + tint + rng.standard_normal((side, side, 3), dtype=np.float32) * 6.0
  color = np.asarray(COLOR_RGB[attrs.color], np.float32) + rng.uniform(-15.0, 15.0, size=3)
  shading = 1.0 + rng.standard_normal((side, side, 1), dtype=np.float32) * 0.03
  image = background * (1.0 - alpha) + (color * shading).astype(np.float32) * alpha
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _partials(shape: str, f0: float, nyquist: float) -> List[Tuple[float, float]]:
  """(frequency ratio, amplitude) of the tone's partials; the fundamental is always loudest."""
  if shape == "circle":  # pure sine
    parts = [(1.0, 1.0)]
  elif shape == "square":  # square wave: odd harmonics at 1/n
    parts = [(n, 1.0 / n) for n in range(1, 16, 2)]
  elif shape == "triangle":  # sawtooth: all harmonics at 1/n
    parts = [(n, 1.0 / n) for n in range(1, 13)]
  elif shape == "star":  # sparkle: fundamental plus a bright cluster of high harmonics
    parts = [(1.0, 1.0), (4.0, 0.5), (5.0, 0.45), (6.0, 0.4)]
  elif shape == "cross":  # hollow: fundamental and octave, amplitude-modulated below
    parts = [(1.0, 1.0), (2.0, 0.6)]
  elif shape == "ring":  # bell: inharmonic partials, decaying below
    parts = [(1.0, 1.0), (2.76, 0.5), (5.40, 0.25), (8.93, 0.12)]
  else:
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
  return [(k, a) for k, a in parts if k * f0 < 0.9 * nyquist]


def synthesize_sound(attrs: Attributes, rng: np.random.Generator, seconds: float = 1.0,
                     sample_rate: int = 16000) -> np.ndarray:
  """A tone encoding `attrs`, float32 `[round(seconds * sample_rate)]`.

  Pitch <- colour (`COLOR_PITCH_HZ`, +-0.3 semitone jitter), timbre <- shape (`_partials`),
  RMS loudness over the tone <- size (`SIZE_RMS`, +-10%), onset time <- position
  (`POSITION_ONSET` of the clip, +-3%); white noise at -46 dBFS everywhere.
  """
  n = int(round(seconds * sample_rate))
  f0 = COLOR_PITCH_HZ[attrs.color] * 2.0 ** (rng.uniform(-0.3, 0.3) / 12)
  onset = int((POSITION_ONSET[attrs.position] + rng.uniform(-0.03, 0.03)) * n)
  length = min(int(0.3 * n * rng.uniform(0.9, 1.1)), n - onset)
  t = np.arange(length, dtype=np.float64) / sample_rate
  tone = np.zeros(length)
  for ratio, amp in _partials(attrs.shape, f0, sample_rate / 2):
    tone += amp * np.sin(2 * np.pi * ratio * f0 * t + rng.uniform(0, 2 * np.pi))
  attack = min(int(0.01 * sample_rate), length // 4)
  release = min(int(0.03 * sample_rate), length // 4)
  env = np.ones(length)
  env[:attack] = np.linspace(0.0, 1.0, attack, endpoint=False)
  if release:
    env[length - release:] *= np.linspace(1.0, 0.0, release)
  if attrs.shape == "ring":
    env *= np.exp(-2.0 * t / (t[-1] + 1e-9))
  if attrs.shape == "cross":
    env *= 1.0 + 0.5 * np.sin(2 * np.pi * 16.0 * t)
  tone *= env
  tone *= SIZE_RMS[attrs.size] * rng.uniform(0.9, 1.1) / (np.sqrt(np.mean(tone**2)) + 1e-12)
  audio = rng.standard_normal(n, dtype=np.float32) * 0.005
  audio[onset:onset + length] += tone.astype(np.float32)
  return np.clip(audio, -1.0, 1.0)


def espeak_available() -> bool:
  """Whether Debian's `espeak-ng` binary is on PATH (needed for `audio_mode="speech"`)."""
  return shutil.which("espeak-ng") is not None


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Band-limited FFT resampling of a 1-D signal."""
  if rate_in == rate_out or x.size == 0:
    return x.astype(np.float32)
  n_out = max(1, int(round(x.size * rate_out / rate_in)))
  spectrum = np.fft.rfft(x.astype(np.float64))
  keep = min(spectrum.size, n_out // 2 + 1)
  out = np.fft.irfft(spectrum[:keep], n_out) * (n_out / x.size)
  return out.astype(np.float32)


@functools.lru_cache(maxsize=8192)
def _espeak(text: str, voice: str, rate: int, pitch: int, sample_rate: int) -> np.ndarray:
  """`text` spoken by espeak-ng, leading/trailing silence trimmed, float32 at `sample_rate`."""
  exe = shutil.which("espeak-ng")
  if exe is None:
    raise RuntimeError("speech audio needs Debian's espeak-ng binary (apt-get install espeak-ng), "
                       "which is not on PATH")
  proc = subprocess.run([exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                        capture_output=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"espeak-ng failed (voice {voice!r}, text {text!r}): "
                       f"{proc.stderr.decode(errors='replace').strip()}")
  try:
    pcm, rate_in = read_wav(proc.stdout)
  except ValueError as e:
    raise RuntimeError(f"espeak-ng --stdout (voice {voice!r}, text {text!r}): {e}") from e
  voiced = np.flatnonzero(np.abs(pcm) > 1e-3)
  if voiced.size:
    pcm = pcm[voiced[0]:voiced[-1] + 1]
  out = _resample(pcm, rate_in, sample_rate)
  out.setflags(write=False)
  return out


def synthesize_speech(text: str, rng: np.random.Generator, seconds: float = 4.0,
                      sample_rate: int = 16000) -> np.ndarray:
  """`text` spoken by espeak-ng with a drawn voice, rate and pitch, float32 `[seconds * rate]`.

  The utterance starts after a drawn lead-in of up to 0.15 s; one that does not fit is spoken
  again faster (up to `ESPEAK_MAX_RATE` words per minute), then cut with a short fade.
  """
  n = int(round(seconds * sample_rate))
  voice = ESPEAK_VOICES[int(rng.integers(len(ESPEAK_VOICES)))]
  rate, pitch = int(rng.integers(150, 186)), int(rng.integers(35, 66))
  lead = int(rng.uniform(0.0, 0.15) * sample_rate)
  room = max(1, n - lead - int(0.05 * sample_rate))
  speech = _espeak(text, voice, rate, pitch, sample_rate)
  if speech.size > room:
    faster = min(ESPEAK_MAX_RATE, int(math.ceil(rate * speech.size / room * 1.05)))
    speech = _espeak(text, voice, faster, pitch, sample_rate)
  speech = np.array(speech[:n - lead], np.float32)
  fade = min(speech.size, int(0.02 * sample_rate))
  if speech.size >= n - lead and fade:
    speech[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
  gain = rng.uniform(0.5, 0.9) / (np.abs(speech).max() + 1e-9)
  audio = rng.standard_normal(n, dtype=np.float32) * 0.002
  audio[lead:lead + speech.size] += speech * gain
  return np.clip(audio, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size and rendering of the embedded dataset; every field is part of its identity.

  `audio_seconds` is the clip length in `"sound"` mode, `speech_seconds` in `"speech"` mode.
  `speech_fallback=True` makes speech mode fall back to sound (with a warning) when espeak-ng is
  missing instead of raising. Splits named in `heldout_splits` use only the held-out tuples.
  """
  seed: int = 0
  num_train: int = 2000
  num_val: int = 250
  num_test: int = 250
  image_size: int = 64
  audio_seconds: float = 1.0
  audio_mode: str = "sound"
  speech_seconds: float = 4.0
  speech_fallback: bool = False
  heldout_fraction: float = 0.15
  heldout_splits: Tuple[str, ...] = ("test",)
  captions_per_item: int = 5
  sample_rate: int = 16000
  depth: bool = False

  def __post_init__(self):
    splits = self.heldout_splits
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    object.__setattr__(self, "heldout_splits", splits)
    for name in ("num_train", "num_val", "num_test"):
      if getattr(self, name) < 0:
        raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not 16 <= self.image_size <= 512:
      raise ValueError(f"SyntheticConfig.image_size must be in [16, 512], got {self.image_size}")
    if self.audio_mode not in AUDIO_MODES:
      raise ValueError(f"SyntheticConfig.audio_mode must be one of {AUDIO_MODES}, "
                       f"got {self.audio_mode!r}")
    if self.audio_seconds <= 0.05 or self.speech_seconds <= 0.5:
      raise ValueError("SyntheticConfig.audio_seconds must be > 0.05 and speech_seconds > 0.5, "
                       f"got {self.audio_seconds} and {self.speech_seconds}")
    if not 0.0 <= self.heldout_fraction <= 0.5:
      raise ValueError("SyntheticConfig.heldout_fraction must be in [0, 0.5], "
                       f"got {self.heldout_fraction}")
    unknown = set(self.heldout_splits) - set(SPLITS)
    if unknown:
      raise ValueError(f"SyntheticConfig.heldout_splits has unknown splits {sorted(unknown)}")
    if "train" in self.heldout_splits:
      raise ValueError("SyntheticConfig.heldout_splits may not contain 'train'")
    if self.captions_per_item < 1:
      raise ValueError(f"SyntheticConfig.captions_per_item must be >= 1, "
                       f"got {self.captions_per_item}")
    if self.sample_rate < 8000:
      raise ValueError(f"SyntheticConfig.sample_rate must be >= 8000, got {self.sample_rate}")


def _choose_heldout(seed: int, fraction: float) -> np.ndarray:
  """Deterministic, balanced held-out tuples: each pick raises the held-out count of the values
  it uses as little as possible, and every value keeps >= 1/2 of its tuples seen."""
  count = int(round(fraction * NUM_GROUPS))
  order = _rng(seed, _STREAM_HELDOUT).permutation(NUM_GROUPS)
  tuples = [attributes_of(g) for g in range(NUM_GROUPS)]
  used = {(name, v): 0 for name in ATTRIBUTE_NAMES for v in VOCAB[name]}
  limit = {(name, v): NUM_GROUPS // len(VOCAB[name]) // 2 for name in ATTRIBUTE_NAMES
           for v in VOCAB[name]}
  chosen: List[int] = []
  candidates = list(order)
  while len(chosen) < count:
    best, best_cost = None, None
    for g in candidates:
      keys = list(zip(ATTRIBUTE_NAMES, tuples[g]))
      if any(used[k] >= limit[k] for k in keys):
        continue
      cost = sum(used[k] * len(VOCAB[k[0]]) for k in keys)
      if best_cost is None or cost < best_cost:
        best, best_cost = g, cost
    if best is None:
      break
    chosen.append(int(best))
    candidates.remove(best)
    for k in zip(ATTRIBUTE_NAMES, tuples[best]):
      used[k] += 1
  return np.sort(np.asarray(chosen, np.int64))


class SplitSource:
  """One split as a random-access source (`len`, `[index]`), e.g. for grain."""

  def __init__(self, dataset: "SyntheticTriModal", split: str):
    self.dataset = dataset
    self.split = split

  def __len__(self) -> int:
    return self.dataset.num_examples(self.split)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return self.dataset.example(self.split, index)

  def __repr__(self) -> str:
    return f"SplitSource(split={self.split!r}, len={len(self)}, config={self.dataset.config})"


class SyntheticTriModal:
  """The procedural image / audio / text dataset described in the module docstring."""

  vocab = VOCAB
  prompts_for = staticmethod(prompts_for)

  def __init__(self, config: Optional[SyntheticConfig] = None):
    self.config = config = config or SyntheticConfig()
    self.audio_mode = config.audio_mode
    if config.audio_mode == "speech" and not espeak_available():
      message = ("SyntheticConfig.audio_mode='speech' needs Debian's espeak-ng binary "
                 "(apt-get install espeak-ng), which is not on PATH")
      if not config.speech_fallback:
        raise RuntimeError(message + "; use audio_mode='sound' or speech_fallback=True")
      warnings.warn(message + "; falling back to audio_mode='sound'")
      self.audio_mode = "sound"
    self.heldout_groups = _choose_heldout(config.seed, config.heldout_fraction)
    self.seen_groups = np.setdiff1d(np.arange(NUM_GROUPS), self.heldout_groups)
    self._groups = {split: self._assign(split) for split in SPLITS}

  def _assign(self, split: str) -> np.ndarray:
    """Group of each example of `split`: pool tuples in a fresh permutation per pass."""
    pool = self.heldout_groups if split in self.config.heldout_splits else self.seen_groups
    n = self.num_examples(split)
    if n and not pool.size:
      raise ValueError(f"split {split!r} needs held-out tuples but heldout_fraction="
                       f"{self.config.heldout_fraction} holds none out")
    passes = -(-n // max(pool.size, 1))
    perms = [_rng(self.config.seed, _STREAM_ASSIGN, _SPLIT_CODE[split], p).permutation(pool)
             for p in range(passes)]
    return np.concatenate(perms)[:n].astype(np.int64) if perms else np.zeros(0, np.int64)

  def num_examples(self, split: str) -> int:
    if split not in _SPLIT_CODE:
      raise KeyError(f"unknown split {split!r}; known: {SPLITS}")
    return {"train": self.config.num_train, "val": self.config.num_val,
            "test": self.config.num_test}[split]

  def groups(self, split: str) -> np.ndarray:
    """Group id of every example of `split`, int64 `[N]` (positives: equal ids)."""
    self.num_examples(split)
    return self._groups[split].copy()

  def labels(self, split: str, attribute: str) -> np.ndarray:
    """Index into `VOCAB[attribute]` of every example of `split`, int64 `[N]`."""
    name = _canonical_attribute(attribute)
    return np.asarray([VOCAB[name].index(getattr(attributes_of(g), name))
                       for g in self.groups(split)], np.int64)

  def source(self, split: str) -> SplitSource:
    self.num_examples(split)
    return SplitSource(self, split)

  def captions(self, split: str, index: int) -> List[str]:
    """The `captions_per_item` captions of one example; caption k cycles through a drawn
    template order and draws its synonyms from its own stream, so it depends only on (ex, k)."""
    index = self._check_index(split, index)
    attrs = attributes_of(self._groups[split][index])
    key = (_STREAM_TEXT, _SPLIT_CODE[split], index)
    order = _rng(self.config.seed, *key).permutation(len(CAPTION_TEMPLATES))
    return [caption(attrs, _rng(self.config.seed, *key, 1 + k), int(order[k % order.size]))
            for k in range(self.config.captions_per_item)]

  def _check_index(self, split: str, index: int) -> int:
    n = self.num_examples(split)
    index = int(index)
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for split {split!r} of {n} examples")
    return index

  def example(self, split: str, index: int) -> Dict[str, Any]:
    """One example: id, image uint8 `[H, W, 3]`, audio float32 `[S]`, text, captions, group,
    attributes (value names), labels (value indices) and transcript (the spoken caption in
    speech mode, drawn independently of `text`; "" in sound mode); with `config.depth`, also
    depth float32 `[H, W]` (metres, the same scene as `image`)."""
    index = self._check_index(split, index)
    cfg, code = self.config, _SPLIT_CODE[split]
    group = int(self._groups[split][index])
    attrs = attributes_of(group)
    image = self.render_rgb(split, index)
    audio_rng = _rng(cfg.seed, _STREAM_AUDIO, code, index)
    transcript = ""
    if self.audio_mode == "speech":
      transcript = caption(attrs, audio_rng)
      audio = synthesize_speech(transcript, audio_rng, cfg.speech_seconds, cfg.sample_rate)
    else:
      audio = synthesize_sound(attrs, audio_rng, cfg.audio_seconds, cfg.sample_rate)
    captions = self.captions(split, index)
    views = {"depth": self.render_depth(split, index)} if cfg.depth else {}
    return {
        "id": self.example_id(split, index),
        "image": image,
        "audio": audio,
        "text": captions[0],
        "captions": captions,
        "group": group,
        "attributes": attrs._asdict(),
        "labels": {name: VOCAB[name].index(v) for name, v in zip(ATTRIBUTE_NAMES, attrs)},
        "transcript": transcript,
        **views,
    }

  def example_id(self, split: str, index: int) -> str:
    """The id of one example, e.g. "synthetic-s0-train-000012"."""
    return f"synthetic-s{self.config.seed}-{split}-{self._check_index(split, index):06d}"

  def render_depth(self, split: str, index: int) -> np.ndarray:
    """The depth view of one example, float32 `[H, W]` metres (`data/depth.py`), whether or not
    `config.depth` puts it into `example`; cheaper than `example` (no audio)."""
    from edgeglass_jax.data import depth
    index = self._check_index(split, index)
    cfg, code = self.config, _SPLIT_CODE[split]
    attrs = attributes_of(self._groups[split][index])
    return depth.render_depth(attrs, _rng(cfg.seed, _STREAM_IMAGE, code, index),
                              _rng(cfg.seed, _STREAM_DEPTH, code, index), cfg.image_size)

  def render_rgb(self, split: str, index: int) -> np.ndarray:
    """The RGB view of one example, uint8 `[H, W, 3]` (what `example` returns as "image")."""
    index = self._check_index(split, index)
    cfg = self.config
    return render_image(attributes_of(self._groups[split][index]),
                        _rng(cfg.seed, _STREAM_IMAGE, _SPLIT_CODE[split], index), cfg.image_size)

  def records(self, split: str, num_threads: int = 1) -> Iterator[Dict[str, Any]]:
    """Yields the examples of `split` in index order; threads overlap espeak-ng calls."""
    n = self.num_examples(split)
    if num_threads <= 1:
      for i in range(n):
        yield self.example(split, i)
      return
    chunk = 32 * num_threads
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for start in range(0, n, chunk):
        yield from pool.map(lambda i: self.example(split, i), range(start, min(n, start + chunk)))
