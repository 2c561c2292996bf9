"""A word-level tokenizer with CLIP's conventions, for small closed-vocabulary captions.

Ids: the vocabulary words in the order given (0..V-1), then UNK (V), BOS (V+1) and EOS
(V+2), so EOS is the largest id (CLIP pools the text encoder's output at argmax(ids), the
first EOS). A caption is lowercased, a comma becomes a token of its own, words split on
whitespace; encoded as BOS, words (unknown -> UNK), EOS, truncated to max_length with EOS
kept last and padded with EOS as SD 1.x's CLIP tokenizer pads. The empty caption (the
null condition of classifier-free guidance) is [BOS, EOS, EOS, ...].

  tok = WordTokenizer(shapes.VOCAB, max_length=16)
  ids = tok.encode(["a red circle", ""])   # int32 [2, 16]
  tok.decode(ids)                           # ['a red circle', '']
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

UNK = "<|unk|>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
FORMAT = "gdistill-word-tokenizer-v1"
SPECIAL = (UNK, BOS, EOS)


def split_words(text: str) -> list[str]:
  """Lowercased words, the comma a word of its own: 'Red square, bottom' ->
  ['red', 'square', ',', 'bottom']."""
  return text.lower().replace(",", " , ").split()


class WordTokenizer:
  """Words <-> int32 ids: vocab, then <|unk|>, <|startoftext|>, <|endoftext|> (largest)."""

  def __init__(self, vocab: Sequence[str], max_length: int = 77):
    vocab = [str(w) for w in vocab]
    if max_length < 2:
      raise ValueError(f"max_length={max_length}: need >= 2 to hold "
                       f"{BOS} and {EOS}.")
    bad = [w for w in vocab if w in SPECIAL or split_words(w) != [w]]
    if bad:
      raise ValueError(f"vocab words {bad[:5]} are special tokens, not lowercase, empty, "
                       "or not one token (whitespace or a comma inside a word).")
    if len(set(vocab)) != len(vocab):
      raise ValueError("vocab has repeated words.")
    self.vocab = tuple(vocab)
    self.max_length = int(max_length)
    self.unk_id = len(vocab)
    self.bos_id = len(vocab) + 1
    self.eos_id = len(vocab) + 2
    self._ids = {w: i for i, w in enumerate(self.vocab)}
    self._words = self.vocab + SPECIAL

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included (EOS = vocab_size - 1)."""
    return len(self._words)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, max_length]: BOS, word ids, EOS, then EOS padding."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of captions, not one string.")
    out = np.full((len(texts), self.max_length), self.eos_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self._ids.get(w, self.unk_id) for w in split_words(str(text))]
      ids = [self.bos_id] + ids[:self.max_length - 2]  # EOS stays in the last slot.
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> str | list[str]:
    """Text of ids [L] (a str) or [N, L] (a list): the words between BOS and the first EOS,
    unknown ones as <|unk|>, commas attached to the word before."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    if ids.ndim != 1:
      raise ValueError(f"ids of shape {ids.shape}: expected [L] or [N, L].")
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.vocab_size:
      raise ValueError(f"ids outside 0..{self.vocab_size - 1}.")
    words = []
    for i in ids.tolist():
      if i == self.eos_id:
        break
      if i != self.bos_id:
        words.append(self._words[i])
    return " ".join(words).replace(" ,", ",")

  def to_json(self) -> str:
    return json.dumps({"format": FORMAT, "vocab": list(self.vocab),
                       "max_length": self.max_length})

  @classmethod
  def from_json(cls, text: str) -> WordTokenizer:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      raise ValueError(f"not a {FORMAT} tokenizer: {str(text)[:80]!r}")
    return cls(data["vocab"], max_length=int(data["max_length"]))

  def __eq__(self, other) -> bool:
    return (isinstance(other, WordTokenizer) and self.vocab == other.vocab
            and self.max_length == other.max_length)

  def __hash__(self) -> int:
    return hash((self.vocab, self.max_length))

  def __repr__(self) -> str:
    return f"WordTokenizer({len(self.vocab)} words, max_length={self.max_length})"
