"""Question-answer data on the synthetic set: questions about each attribute of what an example
shows (image) or sounds like (audio), "describe ..." instructions answered by its captions,
text-only instructions, spoken questions (espeak-ng) and minimal-edit preference pairs.

An item is `QAItem(example, modality, kind, template)`: `example` indexes a split of
`synthetic.SyntheticTriModal` (held-out attribute combinations live only in the held-out
splits, so training never sees them), `modality` is "image", "audio" or "text" (the attributes
are given in the prompt, no soft tokens), `kind` an attribute name or "describe", `template`
the phrasing. Attribute answers are one canonical sentence per value (`answer_text`: "it is
red", "it is a star", "it is at the left"), so exact match is well defined; "describe" answers
are the example's captions in training and the canonical caption (`canonical_caption`) for
pairs. A minimal-edit pair (`minimal_edit`) is that canonical sentence and the same sentence
with exactly one attribute word replaced by another value of that attribute.
"""
from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from edgeglass_jax.data import synthetic

KINDS = synthetic.ATTRIBUTE_NAMES + ("describe",)
QA_MODALITIES = ("image", "audio", "text")

QUESTIONS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "image": {
        "color": ("what color is the shape?", "which colour is the object in the picture?",
                  "what is the color of the shape?", "tell me the colour of the object."),
        "shape": ("what shape is it?", "which shape is in the picture?",
                  "what kind of shape do you see?", "name the shape in the image."),
        "size": ("is the shape small or large?", "how big is the shape?",
                 "what size is the object?", "is the object in the picture big or small?"),
        "position": ("where is the shape?", "is the shape on the left, in the center or on the "
                     "right?", "where in the picture is the object?", "which side is the shape on?"),
        "describe": ("describe the image.", "what do you see?",
                     "describe the picture in one sentence.", "write a caption for this image."),
    },
    "audio": {
        "color": ("what color does the sound stand for?", "which colour does this tone encode?",
                  "what is the color of the sound?"),
        "shape": ("what shape does the sound stand for?", "which shape does this tone encode?",
                  "what is the shape of the sound?"),
        "size": ("is the sound small or large?", "what size does this tone encode?",
                 "how big is the sound?"),
        "position": ("where does the sound come from?", "what position does this tone encode?",
                     "is the sound on the left, in the center or on the right?"),
        "describe": ("describe the sound.", "what do you hear?", "write a caption for this sound."),
    },
    "text": {
        "color": ("{caption}. what color is it?", "{caption}. which colour is the shape?"),
        "shape": ("{caption}. what shape is it?", "{caption}. which shape is it?"),
        "size": ("{caption}. is it small or large?", "{caption}. how big is it?"),
        "position": ("{caption}. where is it?", "{caption}. which side is it on?"),
        "describe": ("say it again: {caption}.", "repeat the sentence: {caption}."),
    },
}
ANSWERS = {"color": "it is {}", "shape": "it is a {}", "size": "it is {}",
           "position": "it is at the {}"}
CAPTION = "a {size} {color} {shape} at the {position}"


class QAItem(NamedTuple):
  example: int
  modality: str
  kind: str
  template: int


def question_words() -> List[str]:
  """Every word and punctuation mark of the questions and answers (for word tokenizers)."""
  texts = [q for table in QUESTIONS.values() for qs in table.values() for q in qs]
  texts += list(ANSWERS.values()) + [CAPTION, "answer:"]
  words = set()
  for text in texts:
    words.update(re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w*\}", " ", text)))
  return sorted(words)


def answer_text(attribute: str, attrs: synthetic.Attributes) -> str:
  """The canonical answer sentence to a question about `attribute` of `attrs`."""
  return ANSWERS[attribute].format(getattr(attrs, attribute))


def canonical_caption(attrs: synthetic.Attributes) -> str:
  return CAPTION.format(**attrs._asdict())


def question_text(item: QAItem, attrs: synthetic.Attributes, caption: str = "") -> str:
  """The question (prompt) of `item`; text-only items quote `caption` (default canonical)."""
  template = QUESTIONS[item.modality][item.kind][item.template]
  return template.format(caption=caption or canonical_caption(attrs)) if "{" in template \
      else template


def items_for(num_examples: int, modalities: Sequence[str], kinds: Sequence[str], seed: int,
              split_code: int) -> List[QAItem]:
  """Every (example, modality, kind) of a split once, its phrasing drawn from
  `(seed, split_code, example)`; deterministic."""
  for m in modalities:
    if m not in QA_MODALITIES:
      raise ValueError(f"QA modality {m!r} is not one of {QA_MODALITIES}")
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f"QA kind {k!r} is not one of {KINDS}")
  out = []
  for e in range(num_examples):
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 77, split_code, e])
    for m in modalities:
      for k in kinds:
        out.append(QAItem(e, m, k, int(rng.integers(len(QUESTIONS[m][k])))))
  return out


def value_of(text: str, attribute: str) -> Optional[str]:
  """The one value of `attribute` whose canonical word `text` names, None if none or several."""
  words = set(re.findall(r"\w+", text.lower()))
  hits = [v for v in synthetic.VOCAB[attribute] if v in words]
  return hits[0] if len(hits) == 1 else None


def minimal_edit(sentence: str, attribute: str, value: str, new_value: str) -> str:
  """`sentence` with the word `value` (of `attribute`) replaced by `new_value`; exactly one
  word changes. Raises ValueError when `value` is not a word of it exactly once."""
  if new_value == value or new_value not in synthetic.VOCAB[attribute]:
    raise ValueError(f"{new_value!r} is not another {attribute} than {value!r}")
  tokens = sentence.split(" ")
  stripped = [re.sub(r"[^\w]", "", t).lower() for t in tokens]
  where = [i for i, t in enumerate(stripped) if t == value]
  if len(where) != 1:
    raise ValueError(f"{value!r} occurs {len(where)} times in {sentence!r}; a minimal edit "
                     "needs it exactly once")
  tokens[where[0]] = tokens[where[0]].lower().replace(value, new_value)
  return " ".join(tokens)


def preference_pair(item: QAItem, attrs: synthetic.Attributes,
                    rng: np.random.Generator) -> Tuple[str, str, str]:
  """(chosen, rejected, attribute): the canonical answer of `item` and the same sentence with
  one attribute (the asked one; for "describe" a drawn one) set to a drawn wrong value."""
  attribute = item.kind if item.kind != "describe" else \
      synthetic.ATTRIBUTE_NAMES[int(rng.integers(len(synthetic.ATTRIBUTE_NAMES)))]
  chosen = canonical_caption(attrs) if item.kind == "describe" else answer_text(item.kind, attrs)
  value = getattr(attrs, attribute)
  others = [v for v in synthetic.VOCAB[attribute] if v != value]
  rejected = minimal_edit(chosen, attribute, value, others[int(rng.integers(len(others)))])
  return chosen, rejected, attribute


def correct_minimally(answer: str, item: QAItem, attrs: synthetic.Attributes
                      ) -> Optional[Tuple[str, str]]:
  """(chosen, rejected) from a model's own wrong `answer` to an attribute question: rejected is
  the answer, chosen the same sentence with the one wrong attribute word corrected. None when
  the answer is right, is not a sentence of the canonical form, or names no single value."""
  if item.kind == "describe":
    return None
  truth = getattr(attrs, item.kind)
  said = value_of(answer, item.kind)
  if said is None or said == truth:
    return None
  if answer.strip() != ANSWERS[item.kind].format(said):
    return None
  return minimal_edit(answer.strip(), item.kind, said, truth), answer.strip()


def spoken_question(text: str, seed: int, index: int, seconds: float = 4.0,
                    sample_rate: int = 16000) -> np.ndarray:
  """`text` spoken by espeak-ng with a voice drawn from `(seed, index)`, float32 `[S]`."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 78, int(index)])
  return synthetic.synthesize_speech(text, rng, seconds, sample_rate)


def normalize(text: str) -> str:
  """Lower case, punctuation dropped, single spaces: what exact match compares."""
  return " ".join(re.findall(r"\w+", text.lower()))
