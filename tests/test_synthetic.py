"""The embedded tri-modal dataset: determinism, splits, and that each view encodes its tuple."""
import dataclasses
import pickle

import numpy as np
import pytest

from edgeglass_jax.data import synthetic as S

SR = 16000


@pytest.fixture(scope="module")
def ds():
  return S.SyntheticTriModal(S.SyntheticConfig(num_train=300, num_val=60, num_test=120))


@pytest.fixture(scope="module")
def train_examples(ds):
  return [ds.example("train", i) for i in range(120)]


def _peak_hz(audio):
  spectrum = np.abs(np.fft.rfft(audio))
  return np.argmax(spectrum) * SR / audio.size


def _moving_rms(audio, window=160):
  return np.sqrt(np.convolve(audio**2, np.ones(window) / window, mode="same"))


def _shape_mask(attrs, seed, size=64):
  """Pixels of the shape: same random stream, two colours, only the shape's pixels differ."""
  a = S.render_image(attrs._replace(color="red"), np.random.default_rng(seed), size)
  b = S.render_image(attrs._replace(color="blue"), np.random.default_rng(seed), size)
  return np.any(a != b, axis=-1)


def test_example_layout(ds, train_examples):
  ex = train_examples[0]
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (64, 64, 3)
  assert ex["audio"].dtype == np.float32 and ex["audio"].shape == (SR,)
  assert ex["text"] == ex["captions"][0] and len(ex["captions"]) == 5
  attrs = S.Attributes(**ex["attributes"])
  assert S.group_of(attrs) == ex["group"] == ds.groups("train")[0]
  assert ex["labels"] == {k: S.VOCAB[k].index(v) for k, v in ex["attributes"].items()}
  assert len({e["id"] for e in train_examples}) == len(train_examples)
  big = S.SyntheticTriModal(S.SyntheticConfig(image_size=224, audio_seconds=0.5, num_train=4))
  assert big.example("train", 3)["image"].shape == (224, 224, 3)
  assert big.example("train", 3)["audio"].shape == (SR // 2,)


def test_group_ids_roundtrip():
  groups = [S.group_of(S.attributes_of(g)) for g in range(S.NUM_GROUPS)]
  assert groups == list(range(S.NUM_GROUPS)) and S.NUM_GROUPS == 8 * 6 * 2 * 3
  with pytest.raises(ValueError, match="color"):
    S.group_of(S.Attributes("teal", "circle", "small", "left"))


def test_determinism_and_seed_dependence(ds):
  again = S.SyntheticTriModal(ds.config)
  other = S.SyntheticTriModal(S.SyntheticConfig(seed=1, num_train=300, num_val=60, num_test=120))
  for split, i in [("train", 7), ("val", 3), ("test", 11)]:
    a, b, c = ds.example(split, i), again.example(split, i), other.example(split, i)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["audio"], b["audio"])
    assert a["captions"] == b["captions"] and a["group"] == b["group"]
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["audio"], c["audio"])
  assert not np.array_equal(ds.groups("train"), other.groups("train"))
  assert not np.array_equal(ds.heldout_groups, other.heldout_groups)


def test_modalities_have_independent_streams(ds):
  """Changing the image size or caption count leaves the other views of an example unchanged."""
  big = S.SyntheticTriModal(dataclasses.replace(ds.config, image_size=96, captions_per_item=2))
  a, b = ds.example("train", 5), big.example("train", 5)
  np.testing.assert_array_equal(a["audio"], b["audio"])
  assert b["captions"] == a["captions"][:2] and a["group"] == b["group"]


def test_heldout_tuples_never_in_train(ds):
  heldout = set(ds.heldout_groups.tolist())
  assert len(heldout) == round(0.15 * S.NUM_GROUPS)
  assert heldout.isdisjoint(ds.groups("train").tolist())
  assert heldout.isdisjoint(ds.groups("val").tolist())
  assert set(ds.groups("test").tolist()) == heldout  # 120 examples cover all 43 tuples
  for i in range(0, 300, 7):
    ex = ds.example("train", i)
    assert S.group_of(S.Attributes(**ex["attributes"])) not in heldout
  both = S.SyntheticTriModal(S.SyntheticConfig(num_train=10, num_val=30, num_test=30,
                                               heldout_splits=("val", "test")))
  assert set(both.groups("val").tolist()) <= set(both.heldout_groups.tolist())


def test_every_attribute_value_in_train_and_test(ds):
  for name, values in S.VOCAB.items():
    for split in ("train", "test"):
      counts = np.bincount(ds.labels(split, name), minlength=len(values))
      assert (counts > 0).all(), (split, name, counts)
  counts = np.bincount(ds.groups("train"), minlength=S.NUM_GROUPS)[ds.seen_groups]
  assert counts.max() - counts.min() <= 1  # passes through a permutation of the seen tuples


def test_image_colour_lands_in_expected_channel():
  attrs = S.Attributes("red", "square", "large", "center")
  for color, channel in [("red", 0), ("green", 1), ("blue", 2)]:
    for seed in range(3):
      image = S.render_image(attrs._replace(color=color), np.random.default_rng(seed))
      mask = _shape_mask(attrs, seed)
      mean = image[mask].astype(float).mean(0)
      assert np.argmax(mean) == channel, (color, mean)
      assert mean[channel] > image[~mask].astype(float).mean(0)[channel] + 40


def test_image_size_position_and_shape_geometry():
  base = S.Attributes("red", "circle", "small", "left")
  areas = {s: np.mean([_shape_mask(base._replace(size=s), k).sum() for k in range(4)])
           for s in S.SIZES}
  assert areas["large"] > 2.2 * areas["small"]
  xs = {p: np.mean([np.nonzero(_shape_mask(base._replace(position=p), k))[1].mean()
                    for k in range(4)]) for p in S.POSITIONS}
  assert xs["left"] < 24 < xs["center"] < 40 < xs["right"]
  expected_fill = {"circle": (0.72, 0.88), "square": (0.6, 1.0), "triangle": (0.42, 0.58),
                   "star": (0.35, 0.48), "cross": (0.48, 0.6), "ring": (0.55, 0.7)}
  for shape in S.SHAPES:
    for seed in range(3):
      mask = _shape_mask(base._replace(shape=shape, size="large", position="center"), seed)
      ys, xs_ = np.nonzero(mask)
      cy, cx = int(round(ys.mean())), int(round(xs_.mean()))
      assert mask[cy, cx] == (shape != "ring"), shape  # only the ring is hollow
      fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs_) + 1))  # share of the bounding box
      assert expected_fill[shape][0] < fill < expected_fill[shape][1], (shape, fill)


def test_sound_pitch_tracks_colour(train_examples):
  for ex in train_examples:
    semitones = 12 * np.log2(_peak_hz(ex["audio"]) / 220.0)
    assert abs(semitones - 3 * S.COLORS.index(ex["attributes"]["color"])) < 0.5, ex["attributes"]
  attrs = S.Attributes("red", "ring", "small", "center")
  peaks = [_peak_hz(S.synthesize_sound(attrs._replace(color=c), np.random.default_rng(0)))
           for c in S.COLORS]
  assert np.all(np.diff(peaks) > 0)


def test_sound_loudness_tracks_size_and_onset_tracks_position(train_examples):
  rms = {s: [] for s in S.SIZES}
  for ex in train_examples:
    a = ex["audio"]
    rms[ex["attributes"]["size"]].append(np.sqrt(np.mean(a**2)))
    onset = np.argmax(_moving_rms(a) > 0.02) / a.size
    assert abs(onset - S.POSITION_ONSET[ex["attributes"]["position"]]) < 0.05, ex["attributes"]
  assert min(rms["large"]) > 2 * max(rms["small"])


def test_sound_timbre_differs_by_shape():
  """Same pitch and jitter: the spectra of two shapes are far apart, two draws of one are not."""
  def spectrum(shape, seed):
    a = S.synthesize_sound(S.Attributes("red", shape, "large", "center"),
                           np.random.default_rng(seed))
    mag = np.abs(np.fft.rfft(a))
    bands = np.add.reduceat(mag, np.arange(0, mag.size, 100))
    return bands / np.linalg.norm(bands)
  spectra = {s: spectrum(s, 0) for s in S.SHAPES}
  for s in S.SHAPES:
    same = spectra[s] @ spectrum(s, 1)
    others = [spectra[s] @ spectra[t] for t in S.SHAPES if t != s]
    assert same > max(others), (s, same, others)


def test_captions_mention_attributes(train_examples):
  for ex in train_examples:
    attrs = ex["attributes"]
    for text in ex["captions"]:
      assert any(w in text for w in S.COLOR_WORDS[attrs["color"]]), text
      assert any(w in text for w in S.SHAPE_WORDS[attrs["shape"]]), text
      assert any(w in text for w in S.SIZE_WORDS[attrs["size"]]), text
      assert any(w in text for w in S.POSITION_WORDS[attrs["position"]]), text
      assert " a a" not in text and " a o" not in text and " a e" not in text, text
    assert len(set(ex["captions"])) >= 4
  assert len({ex["text"] for ex in train_examples}) > 100


def test_prompts_for():
  colors = S.prompts_for("colour")
  assert colors[S.COLORS.index("orange")] == "a photo of an orange shape"
  assert len(colors) == 8 and all(c in p for c, p in zip(S.COLORS, colors))
  assert S.prompts_for("position") == ["a photo of a shape on the left",
                                       "a photo of a shape in the center",
                                       "a photo of a shape on the right"]
  assert S.prompts_for("shape", "a drawing of a {}")[0] == "a drawing of a circle"
  with pytest.raises(KeyError, match="texture"):
    S.prompts_for("texture")


def test_source_is_random_access_and_picklable(ds):
  src = ds.source("val")
  assert len(src) == 60
  np.testing.assert_array_equal(src[59]["image"], ds.example("val", 59)["image"])
  with pytest.raises(IndexError, match="val"):
    src[60]
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[np.int64(4)]["audio"], src[4]["audio"])
  assert [r["id"] for r in ds.records("val", num_threads=2)] == [src[i]["id"] for i in range(60)]


def test_config_validation():
  with pytest.raises(ValueError, match="audio_mode"):
    S.SyntheticConfig(audio_mode="music")
  with pytest.raises(ValueError, match="heldout_splits"):
    S.SyntheticConfig(heldout_splits=("train",))
  with pytest.raises(ValueError, match="held-out"):
    S.SyntheticTriModal(S.SyntheticConfig(heldout_fraction=0.0))
  with pytest.raises(KeyError, match="dev"):
    S.SyntheticTriModal(S.SyntheticConfig(num_train=2)).num_examples("dev")


def test_speech_without_espeak_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(S.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="espeak-ng"):
    S.SyntheticTriModal(S.SyntheticConfig(audio_mode="speech"))
  with pytest.warns(UserWarning, match="espeak-ng"):
    fallback = S.SyntheticTriModal(S.SyntheticConfig(audio_mode="speech", speech_fallback=True,
                                                     num_train=2))
  assert fallback.audio_mode == "sound" and fallback.example("train", 1)["audio"].shape == (SR,)


def test_speech_mode_speaks_a_caption():
  if not S.espeak_available():
    pytest.skip("Debian's espeak-ng binary is not installed")
  cfg = S.SyntheticConfig(audio_mode="speech", num_train=3, speech_seconds=3.0)
  speech = S.SyntheticTriModal(cfg)
  for i in range(3):
    ex = speech.example("train", i)
    audio = ex["audio"]
    assert audio.dtype == np.float32 and audio.shape == (3 * SR,)
    assert np.sqrt(np.mean(audio**2)) > 0.03
    voiced = np.flatnonzero(_moving_rms(audio) > 0.02) / SR
    assert voiced[-1] - voiced[0] > 0.8  # a sentence, not a click
    assert any(w in ex["transcript"] for w in S.COLOR_WORDS[ex["attributes"]["color"]])
    np.testing.assert_array_equal(audio, S.SyntheticTriModal(cfg).example("train", i)["audio"])


def test_resample_keeps_frequency_and_length():
  t = np.arange(22050) / 22050
  out = S._resample(np.sin(2 * np.pi * 1000.0 * t), 22050, SR)
  assert out.dtype == np.float32 and out.shape == (SR,)
  assert abs(_peak_hz(out) - 1000.0) <= 1.0
  np.testing.assert_allclose(np.sqrt(np.mean(out**2)), np.sqrt(0.5), rtol=1e-3)


def test_zero_shot_tasks_come_from_the_data_source():
  """The synthetic source gives its attribute prompts and labels; a manifest gives none."""
  from edgeglass_jax import configs
  from edgeglass_jax.data import sources
  tasks = sources.zero_shot(configs.synthetic_data())
  assert list(tasks.prompts) == list(S.ATTRIBUTE_NAMES)
  items = [S.Attributes("blue", "star", "small", "right"),
           S.Attributes("red", "ring", "large", "left")]
  labels = tasks.labels(np.array([S.group_of(a) for a in items]))
  for name in S.ATTRIBUTE_NAMES:
    assert labels[name].shape == (2,) and labels[name].dtype == np.int32
    assert tasks.prompts[name] == S.prompts_for(name)
  assert labels["color"].tolist() == [S.COLORS.index("blue"), S.COLORS.index("red")]
  assert "star" in tasks.prompts["shape"][labels["shape"][0]]
  assert "left" in tasks.prompts["position"][labels["position"][1]]
  manifest = configs.synthetic_data()
  manifest.source = "manifest"
  assert sources.zero_shot(manifest) is None
