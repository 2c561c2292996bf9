"""What a model is conditioned on, from the config: class labels, or captions and their tokenizer.

model.conditioning 'label': the batch field 'label' (int [B]); 'text': the field 'tokens'
(int [B, text.max_length]) made by a word-level tokenizer of the dataset's vocabulary with
CLIP's conventions (gdistill/tokenizer.py), or by CLIP's BPE tokenizer of a Stable Diffusion
checkpoint (text.tokenizer 'clip' with text.tokenizer_path; gdistill/clip_tokenizer.py). A text teacher's export records its tokenizer, so
a loaded model tokenizes prompts exactly as it was trained.
"""
from __future__ import annotations

import json
from typing import Optional

from gdistill.tokenizer import WordTokenizer


class CLIPTokenIds:
  """CLIP's token-id conventions without its BPE merges: vocab_size, <|startoftext|> 49406 and
  <|endoftext|> 49407 (the padding), so the empty prompt - the null condition - and every
  shape are known. Enough for --mode=compile of a Stable Diffusion config; encoding text
  needs the BPE files of a checkpoint's tokenizer/ folder (text.tokenizer_path)."""

  def __init__(self, vocab_size: int = 49408, max_length: int = 77):
    self.vocab_size, self.max_length = int(vocab_size), int(max_length)
    self.bos_id, self.eos_id = self.vocab_size - 2, self.vocab_size - 1

  def encode(self, texts):
    import numpy as np
    if any(str(t) for t in texts):
      from gdistill import config_lib
      raise config_lib.ConfigError(
          "text.tokenizer='clip' encodes prompts with the BPE vocabulary of a Stable Diffusion "
          "checkpoint's tokenizer/ folder: set --config.text.tokenizer_path=DIR/tokenizer, or "
          "--config.init_from=DIR (a diffusers directory, which sets it); without it only the "
          "empty prompt (the null condition) is known")
    out = np.full((len(texts), self.max_length), self.eos_id, np.int32)
    out[:, 0] = self.bos_id
    return out

  def to_json(self) -> str:
    return json.dumps({"format": "clip-token-ids", "vocab_size": self.vocab_size,
                       "max_length": self.max_length})


def tokenizer_for(config, vocabulary=None) -> Optional[WordTokenizer]:
  """The tokenizer of a text-conditioned config (None for labels). vocabulary: the dataset's
  words (data.dataset_info(...).vocabulary); looked up from the dataset when None."""
  if config.model.conditioning != "text":
    return None
  if config.text.tokenizer == "clip":
    if config.text.tokenizer_path:
      from gdistill.clip_tokenizer import CLIPTokenizer
      return CLIPTokenizer.from_pretrained(config.text.tokenizer_path,
                                           max_length=int(config.text.max_length))
    return CLIPTokenIds(config.text.vocab_size, config.text.max_length)
  if vocabulary is None:
    from gdistill import data
    vocabulary = data.dataset_info(config.data).vocabulary
  if vocabulary is None:
    from gdistill import config_lib
    raise config_lib.ConfigError(
        f"config.model.conditioning='text' needs a captioned dataset; data.name="
        f"{config.data.name!r} has class labels (set model.conditioning='label')")
  return WordTokenizer(vocabulary, max_length=int(config.text.max_length))


def tokenizer_metadata(tokenizer: Optional[WordTokenizer]) -> Optional[dict]:
  """What an export records of its tokenizer (None for label models)."""
  return None if tokenizer is None else json.loads(tokenizer.to_json())


def tokenizer_from_metadata(meta: Optional[dict]) -> Optional[WordTokenizer]:
  if not meta:
    return None
  if meta.get("format") == "clip-token-ids":
    return CLIPTokenIds(meta["vocab_size"], meta["max_length"])
  from gdistill import clip_tokenizer
  if meta.get("format") == clip_tokenizer.FORMAT:
    return clip_tokenizer.CLIPTokenizer.from_json(json.dumps(meta))
  return WordTokenizer.from_json(json.dumps(meta))
