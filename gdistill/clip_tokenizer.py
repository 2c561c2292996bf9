"""CLIP's byte-level BPE tokenizer (Stable Diffusion's `tokenizer/`), on the `tokenizers` library.

The BPE itself is Hugging Face's `tokenizers` (Rust); this module only assembles CLIP's pipeline
the way transformers' CLIPTokenizer does (NFC, whitespace runs -> one space, lowercase; CLIP's
split regex; byte-level; `</w>` word ends; BOS ... EOS) and pads as diffusers' pipelines ask:
`tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`, i.e. BOS, at most
max_length - 2 tokens, EOS, then the pad token (SD 1.x: <|endoftext|>; SD 2.x: "!").

  tok = CLIPTokenizer.from_pretrained("stable-diffusion-v1-5/tokenizer")
  ids = tok.encode(["a photo of a cat", ""])   # int32 [2, 77]

It has WordTokenizer's interface (encode, decode, vocab_size, max_length, to_json / from_json),
so a model built on either is sampled and exported the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np

FORMAT = "gdistill-clip-bpe-tokenizer-v1"
_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
          r"""[^\s\p{L}\p{N}]+""")


def _token(value, default: str) -> str:
  """A special token as tokenizer_config.json / special_tokens_map.json write it (a string
  or {"content": ...})."""
  if value is None:
    return default
  return str(value["content"] if isinstance(value, dict) else value)


class CLIPTokenizer:
  """CLIP BPE: text -> int32 ids [N, max_length] (BOS, tokens, EOS, pad)."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
               max_length: int = 77, bos_token: str = "<|startoftext|>",
               eos_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
               pad_token: str = "<|endoftext|>"):
    try:
      from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
      from tokenizers.models import BPE
    except ImportError as e:  # a runtime dependency (requirements.txt)
      raise ImportError("CLIPTokenizer needs the `tokenizers` package: pip install -r "
                        "requirements.txt") from e
    if max_length < 2:
      raise ValueError(f"max_length={max_length}: need >= 2 to hold BOS and EOS")
    missing = [t for t in (bos_token, eos_token, unk_token, pad_token) if t not in vocab]
    if missing:
      raise ValueError(f"special tokens {missing} are not in the vocabulary (vocab.json)")
    self.vocab = {str(k): int(v) for k, v in vocab.items()}
    self.merges = [tuple(m) for m in merges]
    self.max_length = int(max_length)
    self.bos_token, self.eos_token = bos_token, eos_token
    self.unk_token, self.pad_token = unk_token, pad_token
    self.bos_id, self.eos_id = self.vocab[bos_token], self.vocab[eos_token]
    self.pad_id, self.unk_id = self.vocab[pad_token], self.vocab[unk_token]
    tok = Tokenizer(BPE(vocab=self.vocab, merges=self.merges, dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=unk_token))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    self._tok = tok
    self._words = {i: w for w, i in self.vocab.items()}

  @classmethod
  def from_pretrained(cls, directory: str, max_length: Optional[int] = None) -> CLIPTokenizer:
    """From a diffusers `tokenizer/` folder: vocab.json + merges.txt (Stable Diffusion's
    repositories), or the tokenizers library's tokenizer.json (what transformers 5 saves), and
    the special tokens and model_max_length of tokenizer_config.json / special_tokens_map.json
    when present."""
    has = lambda f: os.path.exists(os.path.join(directory, f))
    if has("vocab.json") and has("merges.txt"):
      with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
      with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
      merges = [tuple(line.split(" ")) for line in lines
                if line and not line.startswith("#version")]
    elif has("tokenizer.json"):
      with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f).get("model", {})
      if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ValueError(f"{directory}/tokenizer.json is not a CLIP BPE tokenizer (model type "
                         f"{model.get('type')!r}, end_of_word_suffix "
                         f"{model.get('end_of_word_suffix')!r}; CLIP's: 'BPE', '</w>')")
      vocab = model["vocab"]
      merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                for m in model["merges"]]
    else:
      raise FileNotFoundError(f"{directory} has neither vocab.json + merges.txt nor "
                              "tokenizer.json: a CLIP tokenizer folder holds one of them")
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise ValueError(f"{directory}: merges {bad[:3]} are not pairs")
    conf = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      path = os.path.join(directory, name)
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          conf.update({k: v for k, v in json.load(f).items() if v is not None})
    model_max = conf.get("model_max_length", 77)
    if not isinstance(model_max, int) or model_max > 10 ** 6:  # transformers' "unset" value
      model_max = 77
    return cls(vocab, merges, max_length=int(max_length or model_max),
               bos_token=_token(conf.get("bos_token"), "<|startoftext|>"),
               eos_token=_token(conf.get("eos_token"), "<|endoftext|>"),
               unk_token=_token(conf.get("unk_token"), "<|endoftext|>"),
               pad_token=_token(conf.get("pad_token"), "<|endoftext|>"))

  def save_pretrained(self, directory: str) -> None:
    """vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json (transformers'
    CLIPTokenizer reads them)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(self.vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
    special = dict(bos_token=self.bos_token, eos_token=self.eos_token,
                   unk_token=self.unk_token, pad_token=self.pad_token)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(dict(special, tokenizer_class="CLIPTokenizer",
                     model_max_length=self.max_length, do_lower_case=True), f, indent=2)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def tokens(self, text: str) -> list[int]:
    """The BPE ids of text, no BOS / EOS, untruncated."""
    return list(self._tok.encode(str(text), add_special_tokens=False).ids)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, max_length]: BOS, the first max_length - 2 tokens, EOS, pad."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of prompts, not one string")
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, enc in enumerate(self._tok.encode_batch([str(t) for t in texts],
                                                     add_special_tokens=False)):
      ids = [self.bos_id] + list(enc.ids)[:self.max_length - 2] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> str | list[str]:
    """Text of ids [L] (a str) or [N, L] (a list): the tokens between BOS and the first EOS."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    keep = []
    for i in ids.tolist():
      if i == self.eos_id:
        break
      if i != self.bos_id:
        keep.append(int(i))
    return self._tok.decode(keep).replace("</w>", " ").strip()

  def digest(self) -> str:
    h = hashlib.sha256(json.dumps([self.vocab, self.merges], sort_keys=True).encode())
    return h.hexdigest()[:16]

  def to_json(self) -> str:
    return json.dumps({"format": FORMAT, "vocab": self.vocab,
                       "merges": [" ".join(m) for m in self.merges],
                       "max_length": self.max_length, "bos_token": self.bos_token,
                       "eos_token": self.eos_token, "unk_token": self.unk_token,
                       "pad_token": self.pad_token}, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> CLIPTokenizer:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      raise ValueError(f"not a {FORMAT} tokenizer: {str(text)[:80]!r}")
    return cls(data["vocab"], [tuple(m.split(" ")) for m in data["merges"]],
               max_length=int(data["max_length"]), bos_token=data["bos_token"],
               eos_token=data["eos_token"], unk_token=data["unk_token"],
               pad_token=data["pad_token"])

  def __eq__(self, other) -> bool:
    return isinstance(other, CLIPTokenizer) and self.to_json() == other.to_json()

  def __hash__(self) -> int:
    return hash((self.digest(), self.max_length, self.pad_token))

  def __repr__(self) -> str:
    return (f"CLIPTokenizer({self.vocab_size} tokens, {len(self.merges)} merges, "
            f"max_length={self.max_length}, pad={self.pad_token!r})")
