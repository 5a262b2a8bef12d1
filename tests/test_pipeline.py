"""Grain loaders over a feature cache: layout, epochs, process shards, resume, captions, eval."""
import json
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from edgeglass_jax import features, sharding
from edgeglass_jax.data import pipeline
from edgeglass_jax.encoders.registry import EncoderOutput

N = 50
CAPTIONS = 3
TOKENS = 3


class _FakeModule:
  """Stands in for a frozen encoder: pooled = x @ w, token j = (j + 1) * pooled."""

  def apply(self, params, x):
    pooled = x @ params["w"]
    tokens = pooled[:, None, :] * jnp.arange(1, TOKENS + 1, dtype=x.dtype)[None, :, None]
    return EncoderOutput(pooled, tokens)


def _encoder(modality, prepare):
  return features.Encoder(modality, _FakeModule(), {"w": np.eye(4, dtype=np.float32)},
                          prepare=lambda values: (np.stack([prepare(v) for v in values]),),
                          token_mask=lambda inputs: None, info={"fake": modality})


def _image_row(img):
  return np.array([img[0, 0, 0], img[0, 0, 1], 0.0, 1.0], np.float32)


def _text_row(text):
  _, item, _, cap = text.split()
  return np.array([int(item), int(cap), 1.0, 0.0], np.float32)


def _records():
  """Item i: image whose pixel (0, 0) is (i, 7); i % 4 captions "item i cap c" (none for i%4=0)."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(N):
    img = rng.integers(0, 255, (6, 5, 3)).astype(np.uint8)
    img[0, 0, :2] = (i, 7)
    caps = [f"item {i} cap {c}" for c in range(i % 4)]
    out.append({"id": f"ex{i:03d}", "image": img, "audio": None, "captions": caps or None,
                "group": i // 2})
  return out


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cache") / "train")
  encoders = {"image": _encoder("image", _image_row), "text": _encoder("text", _text_row)}
  features.extract_split(_records(), path, encoders, sharding.make_mesh(), batch_size=8,
                         shard_size=20, keep_tokens=("image", "text"),
                         captions_per_item=CAPTIONS, progress=False)
  return path


@pytest.fixture(scope="module")
def source(split_dir):
  return pipeline.FeatureSource(split_dir, ("image", "text"), seed=3)


def _memory_mapped(arr):
  while arr is not None and not isinstance(arr, np.memmap):
    arr = arr.base if isinstance(arr, np.ndarray) else None
  return arr is not None


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_items_follow_the_cache(split_dir, source):
  assert len(source) == N and source.ids[7] == "ex007"
  assert len(json.load(open(os.path.join(split_dir, "index.json")))["shards"]) == 3
  item = source[13]
  assert item["image/pooled"].shape == (4,) and item["image/pooled"][0] == 13
  assert item["image/tokens"].shape == (TOKENS, 4) and item["image/token_mask"].all()
  np.testing.assert_allclose(item["image/tokens"][2], 3 * item["image/pooled"])
  assert item["image/valid"] and item["group"] == 6 and item["index"] == 13
  assert item["text/valid"] and item["text/pooled"][0] == 13
  assert 0 <= item["text/pooled"][1] < 13 % 4
  assert item["text/tokens"].shape == (TOKENS, 4)
  empty = source[12]
  assert not empty["text/valid"] and not empty["text/pooled"].any()
  mapped = pipeline.FeatureSource(split_dir, ("image", "text"), seed=3, mmap=True)
  full = np.arange(N)
  _assert_same_batches([source.get_batch(full, 5)], [mapped.get_batch(full, 5)])
  assert _memory_mapped(mapped._parts[2]["image/tokens"])
  assert not _memory_mapped(source._parts[0]["image/tokens"])
  only = pipeline.FeatureSource(split_dir, ("text",), keys=("pooled",))
  assert sorted(only[1]) == ["group", "index", "text/pooled", "text/valid"]
  per_modality = pipeline.FeatureSource(split_dir, ("image", "text"), keys={"image": ("pooled",)},
                                        seed=3, mmap=True)
  assert sorted(per_modality[1]) == sorted(["group", "index", "image/pooled", "image/valid"] +
                                           [k for k in source[1] if k.startswith("text/")])
  pickled = pickle.loads(pickle.dumps(per_modality))
  assert sorted(pickled[1]) == sorted(per_modality[1])
  with pytest.raises(ValueError, match="unknown"):
    pipeline.FeatureSource(split_dir, ("image",), keys={"image": ("pixels",)})


def test_bad_arguments_are_named(split_dir, source, tmp_path):
  with pytest.raises(KeyError, match="audio"):
    pipeline.FeatureSource(split_dir, ("audio",))
  with pytest.raises(FileNotFoundError, match="index.json"):
    pipeline.FeatureSource(str(tmp_path), ("image",))
  with pytest.raises(ValueError, match="larger than the 50"):
    pipeline.make_train_loader(source, 64, seed=0)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_loader(source, 9, seed=0, shard_index=0, shard_count=2)


def test_loader_shapes_and_dtypes(source):
  batch = next(pipeline.make_train_loader(source, 8, seed=0))
  assert batch["image/pooled"].shape == (8, 4) and batch["image/pooled"].dtype == np.float32
  assert batch["image/tokens"].shape == (8, TOKENS, 4)
  assert batch["image/token_mask"].shape == (8, TOKENS) and batch["image/token_mask"].dtype == bool
  assert batch["text/pooled"].shape == (8, 4) and batch["text/tokens"].shape == (8, TOKENS, 4)
  assert batch["text/valid"].shape == (8,) and batch["text/valid"].dtype == bool
  assert batch["group"].dtype == np.int32 and batch["index"].dtype == np.int64
  np.testing.assert_array_equal(batch["image/pooled"][:, 0], batch["index"])
  np.testing.assert_array_equal(batch["text/valid"], batch["index"] % 4 != 0)


def test_every_example_once_per_epoch(source):
  batches = list(pipeline.make_train_loader(source, 10, seed=1, num_epochs=3))
  assert len(batches) == 15
  epochs = [np.concatenate([b["index"] for b in batches[e * 5:(e + 1) * 5]]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(N))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  dropped = list(pipeline.make_train_loader(source, 8, seed=1, num_epochs=2))
  assert len(dropped) == 12
  for e in range(2):
    seen = np.concatenate([b["index"] for b in dropped[e * 6:(e + 1) * 6]])
    assert len(np.unique(seen)) == 48


def test_processes_get_disjoint_halves_of_each_global_batch(source):
  whole = _take(pipeline.make_train_loader(source, 10, seed=4), 10)
  parts = [_take(pipeline.make_train_loader(source, 10, seed=4, shard_index=p, shard_count=2), 10)
           for p in range(2)]
  for step in range(10):
    a, b = parts[0][step]["index"], parts[1][step]["index"]
    assert a.shape == (5,) and not set(a) & set(b)
    np.testing.assert_array_equal(np.concatenate([a, b]), whole[step]["index"])
  first_epoch = np.concatenate([parts[p][s]["index"] for p in range(2) for s in range(5)])
  np.testing.assert_array_equal(np.sort(first_epoch), np.arange(N))


@pytest.mark.parametrize("consumed", [2, 4])
def test_set_state_resumes_the_same_batches(source, consumed):
  it = pipeline.make_train_loader(source, 10, seed=5)
  _take(it, consumed)
  state = it.get_state()
  json.dumps(state)
  expected = _take(it, 4)
  fresh = pipeline.make_train_loader(source, 10, seed=5)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 4), expected)


def test_worker_processes_keep_order_and_state(split_dir):
  mapped = pipeline.FeatureSource(split_dir, ("image", "text"), seed=3, mmap=True)
  expected = _take(pipeline.make_train_loader(mapped, 10, seed=7), 9)
  it = pipeline.make_train_loader(mapped, 10, seed=7, worker_count=2)
  try:
    first = _take(it, 6)
    state = it.get_state()
    json.dumps(state)
    _assert_same_batches(first + _take(it, 3), expected)
  finally:
    it.close()
  resumed = pipeline.make_train_loader(mapped, 10, seed=7, worker_count=2)
  try:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), expected[6:])
  finally:
    resumed.close()


def test_orbax_checkpoint_round_trip(source, tmp_path):
  import orbax.checkpoint as ocp
  it = pipeline.make_train_loader(source, 10, seed=6, shard_index=1, shard_count=2)
  _take(it, 3)
  params = {"w": np.arange(6, dtype=np.float32)}
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                         data=pipeline.iterator_save_args(it)))
    expected = _take(it, 3)
    mngr.wait_until_finished()
  fresh = pipeline.make_train_loader(source, 10, seed=6, shard_index=1, shard_count=2)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    assert mngr.latest_step() == 3
    restored = mngr.restore(3, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), data=pipeline.iterator_restore_args(fresh)))
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  _assert_same_batches(_take(restored["data"], 3), expected)


def test_caption_choice_changes_per_epoch_and_is_reproducible(source):
  many = np.array([i for i in range(N) if i % 4 >= 2])
  draws = np.stack([source.get_batch(many, e)["text/pooled"][:, 1] for e in range(6)])
  valid = source.get_batch(many, 0, all_captions=True)["text/valid"]
  assert valid.shape == (len(many), CAPTIONS)
  assert (draws < (many % 4)[None]).all()
  assert all(len(np.unique(draws[:, j])) > 1 for j in range(len(many)) if many[j] % 4 == 3)
  np.testing.assert_array_equal(draws[2], source.get_batch(many, 2)["text/pooled"][:, 1])
  other = pipeline.FeatureSource(source.split_dir, ("text",), seed=4)
  assert not np.array_equal(other.get_batch(many, 0)["text/pooled"][:, 1], draws[0])
  counts = np.bincount(np.stack([source.get_batch(many, e)["text/pooled"][:, 1]
                                 for e in range(200)]).ravel().astype(int))
  assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0
  a = list(pipeline.make_train_loader(source, 10, seed=2, num_epochs=2))
  b = list(pipeline.make_train_loader(source, 10, seed=2, num_epochs=2))
  _assert_same_batches(a, b)
  for batch in a[5:]:
    drawn = source.get_batch(batch["index"], 1, seed=2)["text/pooled"]
    np.testing.assert_array_equal(batch["text/pooled"], drawn)


def test_eval_batches_cover_everything_once(source):
  batches = pipeline.make_eval_batches(source, 16)
  assert len(batches) == 4
  got = list(batches)
  assert [b["mask"].sum() for b in got] == [16, 16, 16, 2]
  index = np.concatenate([b["index"][b["mask"]] for b in got])
  np.testing.assert_array_equal(index, np.arange(N))
  last = got[-1]
  assert (last["index"][2:] == -1).all() and not last["image/valid"][2:].any()
  assert not last["image/pooled"][2:].any()
  _assert_same_batches(got, list(batches))
  halves = [list(pipeline.make_eval_batches(source, 16, shard_index=p, shard_count=2))
            for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == 4
  seen = np.concatenate([b["index"][b["mask"]] for h in halves for b in h])
  np.testing.assert_array_equal(np.sort(seen), np.arange(N))
  full = next(iter(pipeline.make_eval_batches(source, 16, all_captions=True)))
  assert full["text/pooled"].shape == (16, CAPTIONS, 4) and full["text/valid"].shape == (16, 3)


def test_nan_check_names_key_and_row(source):
  batch = next(pipeline.make_train_loader(source, 8, seed=0))
  pipeline.check_batch_finite(batch)
  batch["text/pooled"] = batch["text/pooled"].copy()
  batch["text/pooled"][5, 1] = np.nan
  bad_id = source.ids[batch["index"][5]]
  with pytest.raises(FloatingPointError, match=rf"'text/pooled'.*row 5 \({bad_id}\)"):
    pipeline.check_batch_finite(batch, source.batch_ids(batch))
  batch["image/tokens"] = jnp.asarray(batch["image/tokens"]).at[2, 0, 0].set(jnp.inf)
  batch["text/pooled"][5, 1] = 0.0
  with pytest.raises(FloatingPointError, match=rf"'image/tokens'.*row 2 \({batch['index'][2]}\)"):
    pipeline.check_batch_finite(batch)


def _tfds():
  return pytest.importorskip("tensorflow_datasets",
                             reason="tensorflow-datasets is not installed")


def test_tfds_random_access_records_feed_extraction(tmp_path):
  """wit_kaggle's builder needs no TensorFlow: image + caption strings via tfds.data_source."""
  tfds = _tfds()
  from edgeglass_jax.data import sources
  from edgeglass_jax.data.tfds_source import TfdsSource
  with tfds.testing.mock_data(num_examples=6):
    src = TfdsSource("wit_kaggle", "train", caption_key="caption_reference_description",
                     id_key="image_url")
    assert src.random_access and len(src) == 6
    records = [src[i] for i in range(len(src))]
    with pytest.raises(KeyError, match="'captions/text'.*caption_reference_description"):
      TfdsSource("wit_kaggle", "train")[0]
  for rec in records:
    assert rec["image"].dtype == np.uint8 and rec["image"].shape[-1] == 3
    assert rec["audio"] is None and rec["group"] == -1 and isinstance(rec["id"], str)
    assert all(isinstance(c, str) and c for c in rec["captions"] or [])
    assert sources.decode(rec, "image").shape == rec["image"].shape
  assert len({r["id"] for r in records}) == 6
  with_text = [r for r in records if r["captions"]]
  assert with_text and sources.decode(with_text[0], "text") == with_text[0]["captions"]
  text_row = lambda t: np.array([len(t), 0.0, 1.0, 0.0], np.float32)
  encoders = {"image": _encoder("image", _image_row), "text": _encoder("text", text_row)}
  split_dir = str(tmp_path / "wit")
  features.extract_split(records, split_dir, encoders, sharding.make_mesh(), batch_size=8,
                         shard_size=4, keep_tokens=(), progress=False)
  feats = pipeline.FeatureSource(split_dir, ("image", "text"))
  batch = next(iter(pipeline.make_eval_batches(feats, 8)))
  np.testing.assert_array_equal(batch["image/pooled"][:6, 0],
                                [r["image"][0, 0, 0] for r in records])
  np.testing.assert_array_equal(batch["text/valid"][:6], [bool(r["captions"]) for r in records])
  np.testing.assert_array_equal(batch["text/pooled"][:6, 0],
                                [len(r["captions"][0]) if r["captions"] else 0 for r in records])


@pytest.mark.parametrize("random_access", [True, False])
def test_tfds_coco_captions_and_librispeech(random_access):
  tfds = _tfds()
  pytest.importorskip("tensorflow", reason="coco_captions' and librispeech's builders declare "
                      "their features with TensorFlow (tensorflow-cpu is not installed)")
  from edgeglass_jax.data.tfds_source import TfdsSource
  with tfds.testing.mock_data(num_examples=3):
    coco = TfdsSource("coco_captions", "train", id_key="image/id", random_access=random_access)
    speech = TfdsSource("librispeech", "train_clean100", image_key=None, caption_key="text",
                        audio_key="speech", id_key="id", random_access=random_access)
    assert coco.random_access == speech.random_access == random_access
    assert len(coco) == len(speech) == 3
    pic, clip = coco[2], speech[-1]
  assert pic["image"].dtype == np.uint8 and pic["image"].ndim == 3
  assert pic["captions"] and all(isinstance(c, str) for c in pic["captions"])
  assert pic["id"].isdigit() and pic["audio"] is None
  assert clip["image"] is None and clip["audio"].dtype == np.float32 and clip["audio"].ndim == 1
  assert np.abs(clip["audio"]).max() <= 1.0 and len(clip["captions"]) == 1
  speech._audio_rate = 8000
  with tfds.testing.mock_data(num_examples=3):
    assert speech[0]["audio"].shape[0] == 2 * speech._data[0]["speech"].shape[0]
