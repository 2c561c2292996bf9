"""What a model is conditioned on, from the config: class labels, or captions and their tokenizer.

model.conditioning 'label': the batch field 'label' (int [B]); 'text': the field 'tokens'
(int [B, text.max_length]) made by a word-level tokenizer of the dataset's vocabulary with
CLIP's conventions (gdistill/tokenizer.py). A text teacher's export records its tokenizer, so
a loaded model tokenizes prompts exactly as it was trained.
"""
from __future__ import annotations

import json
from typing import Optional

from gdistill.tokenizer import WordTokenizer


def tokenizer_for(config, vocabulary=None) -> Optional[WordTokenizer]:
  """The tokenizer of a text-conditioned config (None for labels). vocabulary: the dataset's
  words (data.dataset_info(...).vocabulary); looked up from the dataset when None."""
  if config.model.conditioning != "text":
    return None
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
  return None if not meta else WordTokenizer.from_json(json.dumps(meta))
