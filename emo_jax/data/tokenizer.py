"""Offline tokenizers: train a byte-level BPE on the corpus, or load any local tokenizer.json.

Nothing here fetches from a hub: a tokenizer is either trained from local text or
read from a local file.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
  """A byte-level BPE trained on `texts`; EOS is id 0 and PAD id 1 (trained as special tokens)."""
  if vocab_size < 256 + 2:
    raise ValueError(f"vocab_size={vocab_size} is below 258 (256 bytes + EOS + PAD): raise vocab_size")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=[EOS_TOKEN, PAD_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A `tokenizers.Tokenizer` with the ids the packer needs; picklable via its path."""

  path: str
  eos_id: int
  pad_id: int
  vocab_size: int

  @property
  def backend(self) -> Tokenizer:
    # Loaded lazily and cached per process: worker processes receive only the path.
    cache = _BACKENDS.get(self.path)
    if cache is None:
      cache = Tokenizer.from_file(self.path)
      cache.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not EOS
      _BACKENDS[self.path] = cache
    return cache

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids per text, int32[n_i] each, without special tokens."""
    encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)


_BACKENDS: dict[str, Tokenizer] = {}


def load_tokenizer(
  path: str | os.PathLike,
  eos_id: int | None = None,
  pad_id: int | None = None,
  eos_token: str = EOS_TOKEN,
  pad_token: str = PAD_TOKEN,
) -> TextTokenizer:
  """A local tokenizer.json (a file, or a directory holding one); ids given or looked up by token.

  For the dolma2 tokenizer pass eos_id=100257, pad_id=100277.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / TOKENIZER_FILE
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer file {path} not found: run `emo-jax data build` or pass the path of a tokenizer.json")
  tok = Tokenizer.from_file(str(path))
  vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def resolve(given: int | None, token: str, what: str) -> int:
    found = tok.token_to_id(token) if given is None else given
    if found is None:
      raise ValueError(f"{path} has no {what} token {token!r}: pass its id explicitly ({what.lower()}_id=...)")
    if not 0 <= found < vocab_size:
      raise ValueError(f"{what} id {found} is outside the vocabulary of {path} (size {vocab_size}): pass a valid id")
    return found

  return TextTokenizer(str(path.resolve()), resolve(eos_id, eos_token, "EOS"), resolve(pad_id, pad_token, "PAD"), vocab_size)


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(directory) / TOKENIZER_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path))
  return path
