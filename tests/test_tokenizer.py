"""`load_tokenizer` on a bare BERT `vocab.txt` directory (transformers 5's AutoTokenizer refuses
one) against the tokenizer HF saves with `save_pretrained` from the same vocabulary."""
import os
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from edgeglass_jax.data import preprocess  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "the",
         "##s", "red", "on", "left", "café", "cafe", ",", "!", "##ing", "purr"]
TEXTS = ["a photo of a cat", "Dogs ON the LEFT, purring!", "a café", "unknown words here",
         "  the   red\tcat ", "", "a photo of the red dogs of a cat on the left of the dog"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """(bare: only vocab.txt, saved: `BertTokenizerFast(vocab.txt).save_pretrained`)."""
  root = tmp_path_factory.mktemp("tok")
  bare, saved = root / "bare", root / "saved"
  bare.mkdir()
  (bare / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
  transformers.BertTokenizerFast(str(bare / "vocab.txt")).save_pretrained(str(saved))
  assert os.listdir(bare) == ["vocab.txt"]
  return str(bare), str(saved)


def test_bare_vocab_gives_the_saved_tokenizers_ids(dirs):
  bare, saved = (preprocess.load_tokenizer(d) for d in dirs)
  for max_len in (6, 16):
    ids_b, mask_b = preprocess.tokenize(bare, TEXTS, max_len)
    ids_s, mask_s = preprocess.tokenize(saved, TEXTS, max_len)
    np.testing.assert_array_equal(ids_b, ids_s)
    np.testing.assert_array_equal(mask_b, mask_s)
  ids, _ = preprocess.tokenize(bare, TEXTS[:2], 12)
  np.testing.assert_array_equal(ids[0], [2, 5, 6, 7, 5, 8, 3, 0, 0, 0, 0, 0])
  assert ids[1, 1:3].tolist() == [9, 11] and 1 not in ids[0]  # "dogs" = dog ##s, lowercased


def test_bare_vocab_without_special_tokens_names_the_file(tmp_path):
  (tmp_path / "vocab.txt").write_text("a\ncat\n[UNK]\n")
  with pytest.raises(ValueError, match=r"vocab.txt.*missing \['\[PAD\]', '\[CLS\]', '\[SEP\]'\]"):
    preprocess.load_tokenizer(str(tmp_path))


def test_directory_with_neither_vocab_nor_tokenizer_names_it(dirs, tmp_path):
  empty = tmp_path / "no_tokenizer"
  shutil.copytree(dirs[0], empty)
  os.remove(empty / "vocab.txt")
  (empty / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=f"{empty}: no tokenizer files"):
    preprocess.load_tokenizer(str(empty))
