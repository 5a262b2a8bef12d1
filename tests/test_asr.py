"""Whisper decoder and `asr.transcribe` mechanics on a tiny random HF Whisper.

The model has odd sizes, every parameter perturbed, a 1 s window (max_source_positions 50),
a word-level tokenizer and a generation config with suppressed tokens, so the decoder's logits,
its cached decoding, the HF names and greedy transcription are all checked against HF.
"""
import dataclasses
import json
import os
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from edgeglass_jax import asr, encoders
from edgeglass_jax.encoders import whisper
from edgeglass_jax.weights import WeightsError

V = 71
EOT, SOT, NO_TS = 64, 65, 70
SPECIAL = {"<|endoftext|>": EOT, "<|startoftranscript|>": SOT, "<|translate|>": 66,
           "<|transcribe|>": 67, "<|startofprev|>": 68, "<|nospeech|>": 69,
           "<|notimestamps|>": NO_TS}
SUPPRESS = [3, 5, 11, 65, 66, 67, 68, 69]
BEGIN_SUPPRESS = [0, EOT]
WINDOW = 16000  # 2 * 50 positions * hop 160
MAX_NEW = 12


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def tiny_config():
  return transformers.WhisperConfig(
      vocab_size=V, d_model=36, encoder_layers=1, encoder_attention_heads=3, encoder_ffn_dim=52,
      decoder_layers=2, decoder_attention_heads=3, decoder_ffn_dim=44, num_mel_bins=80,
      max_source_positions=50, max_target_positions=24, decoder_start_token_id=SOT,
      bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, begin_suppress_tokens=None,
      suppress_tokens=None)


def write_tokenizer(path):
  vocab = {f"w{i}": i for i in range(EOT)} | SPECIAL
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(SPECIAL))
  tok.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.WhisperForConditionalGeneration(tiny_config()).eval()
  with torch.no_grad():  # every tensor off its init, so a mapping slip shows
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("whisper_asr"))
  model.save_pretrained(path)
  transformers.GenerationConfig(
      decoder_start_token_id=SOT, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT,
      no_timestamps_token_id=NO_TS, is_multilingual=False, max_length=24,
      suppress_tokens=SUPPRESS, begin_suppress_tokens=BEGIN_SUPPRESS).save_pretrained(path)
  write_tokenizer(path)
  return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
  model, info = transformers.WhisperForConditionalGeneration.from_pretrained(
      hf_dir, output_loading_info=True)
  assert not any(info.values()), info
  return model.eval()


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return asr.load(hf_dir)


def speech_like(seed, seconds, rate=16000):
  """Noise bursts under a few drifting tones: enough structure for a random model."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  x = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t *
                                          (1 + 0.1 * t)) for _ in range(3))
  return (x + 0.05 * rng.standard_normal(len(t)) * (np.sin(7 * t) > 0)).astype(np.float32)


def batch(*clips):
  """Clips -> `[B, WINDOW]`, zero-padded (the padded 1 s window HF's encoder expects)."""
  out = np.zeros((len(clips), WINDOW), np.float32)
  for row, clip in enumerate(clips):
    out[row, :len(clip)] = clip
  return out


def features(audio):
  return np.asarray(whisper.log_mel_spectrogram(audio, 80, n_samples=WINDOW))


def test_config_and_rules(hf_dir):
  module, params = asr.from_pretrained(hf_dir)
  c = module.config
  assert (c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.head_dim, c.mlp_dim,
          c.max_position_embeddings) == (V, 36, 2, 3, 12, 44, 24)
  key = params["params"]["layers_0"]["self_attn"]["key"]
  assert set(key) == {"kernel"}  # no k bias, as HF
  assert set(params["params"]["layers_1"]["encoder_attn"]["key"]) == {"kernel"}


def test_hf_names_round_trip(hf_dir, hf_model):
  module, params = asr.from_pretrained(hf_dir)
  ours = asr.to_hf(module, params)
  state = {k[len("model."):]: v.numpy() for k, v in hf_model.state_dict().items()
           if k.startswith("model.decoder.")}
  assert set(ours) == set(state)
  for name, value in ours.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_logits_match_hf(hf_dir, hf_model):
  encoder, enc_params = encoders.from_pretrained(hf_dir)
  module, params = asr.from_pretrained(hf_dir)
  audio = batch(speech_like(1, 1.0), speech_like(2, 0.6))
  mel = features(audio)
  ids = np.array([[SOT, NO_TS, 7, 30, 2, 41, 63], [SOT, NO_TS, 12, 12, 9, 0, 50]])
  tokens = encoder.apply(enc_params, jnp.asarray(mel)).tokens
  ours = module.apply(params, jnp.asarray(ids), tokens)
  with torch.no_grad():
    ref = hf_model(input_features=torch.from_numpy(mel.transpose(0, 2, 1).copy()),
                   decoder_input_ids=torch.from_numpy(ids)).logits.numpy()
  assert ours.shape == ref.shape == (2, 7, V) and ours.dtype == jnp.float32
  assert rel_err(ours, ref) < 1e-4


def test_cached_decoding_equals_full_sequence(hf_dir):
  """Prefill of 3 tokens, then one token at a time over the cache and the cross-attention
  keys/values computed once, against the full causal pass (suppression included)."""
  encoder, enc_params = encoders.from_pretrained(hf_dir)
  module, params = asr.from_pretrained(hf_dir, suppress_tokens=tuple(SUPPRESS),
                                       begin_suppress_tokens=tuple(BEGIN_SUPPRESS), begin_index=2)
  mel = features(batch(speech_like(3, 0.8), speech_like(4, 1.0)))
  tokens = encoder.apply(enc_params, jnp.asarray(mel)).tokens
  ids = jnp.asarray([[SOT, NO_TS, 5, 17, 33, 8], [SOT, NO_TS, 60, 1, 2, 3]])
  full = module.apply(params, ids, tokens)
  _, cross = module.apply(params, tokens, method="prefill_cross", mutable=[asr.CROSS_CACHE])
  variables = {**params, **cross}
  assert cross[asr.CROSS_CACHE]["layers_0"]["encoder_attn"]["k"].shape == (2, 3, 50, 12)
  cache = module.init_cache(2, 8)
  step = jax.jit(lambda v, x, c: module.apply(v, x, c, method="decode"))
  logits, cache = step(variables, ids[:, :3], cache)
  pieces = [logits]
  for i in range(3, ids.shape[1]):
    logits, cache = step(variables, ids[:, i:i + 1], cache)
    pieces.append(logits)
  cached = np.concatenate(pieces, axis=1)
  finite = np.isfinite(np.asarray(full))
  np.testing.assert_array_equal(np.isfinite(cached), finite)
  assert not finite[:, :, SUPPRESS].any()
  assert not finite[:, 1, BEGIN_SUPPRESS].any() and finite[:, 2:, BEGIN_SUPPRESS].all()
  assert rel_err(np.where(finite, cached, 0), np.where(finite, full, 0)) < 1e-5
  assert int(cache["layers_0"]["end_index"][0]) == 6


def test_decode_without_cross_cache_names_the_problem(hf_dir):
  module, params = asr.from_pretrained(hf_dir)
  with pytest.raises(ValueError, match="no encoder keys/values"):
    module.apply(params, jnp.zeros((1, 1), jnp.int32), module.init_cache(1, 4), method="decode")


def test_generation_settings(loaded):
  assert loaded.prompt == (SOT, NO_TS) and loaded.eos_id == EOT and loaded.window == WINDOW
  assert loaded.decoder.suppress_tokens == tuple(SUPPRESS)
  assert loaded.decoder.begin_suppress_tokens == tuple(BEGIN_SUPPRESS)
  assert loaded.decoder.begin_index == 2
  assert asr.load(loaded.path) is loaded  # once per process


def hf_greedy(hf_model, audio, **kw):
  """HF Whisper `generate` tokens after the prompt, padded with the end id to MAX_NEW."""
  with torch.no_grad():
    ref = hf_model.generate(torch.from_numpy(features(audio).transpose(0, 2, 1).copy()),
                            max_new_tokens=MAX_NEW, **kw).numpy()
  if (ref[:, :2] == [SOT, NO_TS]).all():  # transformers versions differ on returning the prompt
    ref = ref[:, 2:]
  return np.pad(ref, ((0, 0), (0, MAX_NEW - ref.shape[1])),
                constant_values=kw.get("eos_token_id", EOT))


def test_greedy_tokens_equal_hf_generate(loaded, hf_model):
  """Batched greedy decoding through `generate.generate` equals HF Whisper `generate` (forced
  start + no-timestamps, suppress_tokens, begin_suppress_tokens) row by row; then with an end
  token that some rows reach and others do not."""
  audio = batch(*[speech_like(s, 1.0) for s in (5, 6, 7, 8)])
  ours = loaded.token_ids(audio, MAX_NEW)
  assert ours.shape == (4, MAX_NEW) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, hf_greedy(hf_model, audio))
  assert not np.isin(ours, SUPPRESS).any() and not np.isin(ours[:, 0], BEGIN_SUPPRESS).any()
  assert len(np.unique(ours)) > 3
  # an end token met mid-sequence in some row but absent from another
  stops = [t for t in np.unique(ours[:, 1:-1]) if any(t not in row for row in ours)]
  eos = int(stops[0])
  ended = dataclasses.replace(loaded, eos_id=eos).token_ids(audio, MAX_NEW)
  np.testing.assert_array_equal(ended, hf_greedy(hf_model, audio, eos_token_id=eos,
                                                 pad_token_id=eos))
  lengths = [list(row).index(eos) if eos in row else MAX_NEW for row in ours]
  assert min(lengths) < MAX_NEW - 1 and max(lengths) == MAX_NEW
  for row, n in zip(ended, lengths):
    assert (row[n:] == eos).all()


def test_decode_text(loaded):
  assert loaded.decode_text([7, 30, SOT, 2, EOT, 9]) == "w7 w30 w2"
  assert loaded.decode_text([EOT]) == ""


def test_transcribe_matches_token_ids_and_batches(loaded):
  clips = [speech_like(5, 1.0), speech_like(6, 0.7), speech_like(7, 0.4)]
  expected = [loaded.decode_text(loaded.token_ids(c[None], MAX_NEW)[0]) for c in clips]
  assert all(expected)
  got = asr.transcribe(clips, model=loaded.path, max_new_tokens=MAX_NEW, batch_size=2)
  assert got == expected


def test_batch_sizes():
  assert asr._batch_sizes(0, 8) == []
  assert asr._batch_sizes(5, 8) == [5]
  assert asr._batch_sizes(19, 8) == [7, 6, 6]
  assert asr._batch_sizes(16, 8) == [8, 8]
  assert asr._batch_sizes(3, 1) == [1, 1, 1]


def test_long_clip_goes_in_equal_windows(loaded):
  clip = speech_like(8, 2.5)
  pieces = asr.split_windows(clip, WINDOW)
  assert [len(p) for p in pieces] == [13333, 13334, 13333]
  assert np.array_equal(np.concatenate(pieces), clip)
  alone = asr.transcribe(pieces, model=loaded.path, max_new_tokens=MAX_NEW)
  joined = asr.transcribe([clip], model=loaded.path, max_new_tokens=MAX_NEW)
  assert joined == [" ".join(t for t in alone if t)]
  assert asr.split_windows(np.zeros(0, np.float32), WINDOW) == []
  assert [len(p) for p in asr.split_windows(np.ones(WINDOW), WINDOW)] == [WINDOW]


def test_resampling(loaded):
  t = np.arange(44100) / 44100
  tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
  out = asr.resample(tone, 44100)
  assert out.dtype == np.float32 and len(out) == 16000
  ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
  assert np.abs(out[200:-200] - ref[200:-200]).max() < 1e-3  # away from the edges
  clip8k = speech_like(9, 0.9, rate=8000)
  assert asr.transcribe([clip8k], 8000, model=loaded.path, max_new_tokens=MAX_NEW) == \
      asr.transcribe([asr.resample(clip8k, 8000)], model=loaded.path, max_new_tokens=MAX_NEW)


def test_empty_and_silent_audio_skip_the_model(loaded, monkeypatch):
  calls = []
  original = asr.Whisper.token_ids
  monkeypatch.setattr(asr.Whisper, "token_ids",
                      lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
  silent = [np.zeros(0, np.float32), np.zeros(8000, np.float32),
            (1e-5 * np.random.default_rng(0).standard_normal(30000)).astype(np.float32)]
  assert asr.transcribe(silent, model=loaded.path) == ["", "", ""]
  assert asr.transcribe([], model=loaded.path) == []
  assert not calls
  mixed = asr.transcribe([np.zeros(100, np.float32), speech_like(5, 1.0)], model=loaded.path,
                         max_new_tokens=MAX_NEW)
  assert mixed[0] == "" and mixed[1] and len(calls) == 1


def test_bad_inputs_name_the_culprit(loaded, tmp_path):
  with pytest.raises(ValueError, match=r"waves\[1\].*mono"):
    asr.transcribe([np.zeros(10), np.zeros((2, 10))], model=loaded.path)
  with pytest.raises(ValueError, match=r"waves\[0\].*NaN"):
    asr.transcribe([np.full(10, np.nan)], model=loaded.path)
  with pytest.raises(TypeError, match="list of 1-D arrays"):
    asr.transcribe(np.zeros(10, np.float32), model=loaded.path)
  with pytest.raises(ValueError, match="sample_rate"):
    asr.transcribe([np.zeros(10)], 0, model=loaded.path)
  with pytest.raises(ValueError, match="unknown ASR model 'no-such-model'"):
    asr.transcribe([np.ones(10)], model="no-such-model")
  with pytest.raises(ValueError, match=r"prompt of 2 tokens plus max_new_tokens=30"):
    asr.transcribe([speech_like(5, 0.5)], model=loaded.path, max_new_tokens=30)


def test_files(loaded, tmp_path):
  good = tmp_path / "clip.wav"
  clip = speech_like(5, 1.0, rate=22050)
  with wave.open(str(good), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(22050)
    f.writeframes((np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes())
  got = asr.transcribe_files([str(good)], model=loaded.path, max_new_tokens=MAX_NEW)
  assert got == asr.transcribe([whisper.load_audio(str(good))], model=loaded.path,
                               max_new_tokens=MAX_NEW)
  bad = tmp_path / "notes.wav"
  bad.write_bytes(b"not a wav file at all")
  with pytest.raises(ValueError, match="notes.wav"):
    asr.transcribe_files([str(good), str(bad)], model=loaded.path)
  with pytest.raises(ValueError, match="missing.wav"):
    asr.transcribe_files([str(tmp_path / "missing.wav")], model=loaded.path)


def test_not_whisper_directory_is_named(tmp_path):
  cfg = tmp_path / "config.json"
  cfg.write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(WeightsError, match="is not 'whisper'"):
    asr.from_pretrained(str(tmp_path))
