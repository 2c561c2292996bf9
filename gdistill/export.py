"""Hand a finished stage to diffusers: python -m gdistill.export --workdir=W --stage=S --out=DIR.

  python -m gdistill.export --workdir=workdirs/sd --stage=progressive_4 --format=diffusers \\
      --out=students/sd_4step

writes a StableDiffusionPipeline directory (gdistill/diffusers_io.py): the stage's U-Net (a
w-conditioned student with time_cond_proj_dim: its w-embedding is time_embedding.cond_proj),
the teacher's text encoder and tokenizer, the autoencoder as the VAE, and a DDIMScheduler that
reproduces gdistill's sampler. Sample it with diffusers:

  pipe = StableDiffusionPipeline.from_pretrained(DIR)
  images = pipe(prompts, guidance_scale=1 + w, num_inference_steps=N).images

(a student runs one forward per step: diffusers skips classifier-free guidance when the U-Net
has time_cond_proj_dim and feeds guidance_scale - 1 = w to its embedding).

A model trained with gdistill's word-level tokenizer (the embedded shapes) is written with an
equivalent CLIP BPE tokenizer: every vocabulary word is one token with its own id (checked
word by word). Words outside the vocabulary differ: gdistill maps such a word to one
<|unk|> token, the BPE tokenizer to several tokens that all carry <|unk|>'s embedding.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

FORMATS = ("diffusers",)


def word_tokenizer_as_bpe(tok, text_params: dict):
  """(CLIPTokenizer, text encoder params) equivalent to a WordTokenizer on its vocabulary.

  The merges are BPE trained on the vocabulary (each word one token); the intermediate pieces
  get ids after the word tokenizer's and embedding rows copied from <|unk|>'s. Raises ValueError naming a word that does not
  come out as its one token."""
  from gdistill import tokenizer as word_tok
  from gdistill.clip_tokenizer import CLIPTokenizer
  words = list(tok.vocab)
  vocab = {w + "</w>": i for i, w in enumerate(words)}
  vocab.update({word_tok.UNK: tok.unk_id, word_tok.BOS: tok.bos_id, word_tok.EOS: tok.eos_id})
  # BPE training on the vocabulary itself: merge the most frequent adjacent pair in every word
  # that has it, until each word is one symbol. Encoding replays the merges in this order, so
  # every word comes out as its one token (checked below).
  segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
  for seg in segs:
    for p in seg:
      vocab.setdefault(p, len(vocab))
  merges = []
  while any(len(seg) > 1 for seg in segs):
    counts: dict = {}
    for seg in segs:
      for pair in zip(seg, seg[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    pair = max(counts, key=lambda p: (counts[p], p))
    merges.append(pair)
    vocab.setdefault(pair[0] + pair[1], len(vocab))
    for k, seg in enumerate(segs):
      out, i = [], 0
      while i < len(seg):
        if i + 1 < len(seg) and (seg[i], seg[i + 1]) == pair:
          out.append(seg[i] + seg[i + 1])
          i += 2
        else:
          out.append(seg[i])
          i += 1
      segs[k] = out
  bpe = CLIPTokenizer(vocab, merges, max_length=tok.max_length, bos_token=word_tok.BOS,
                      eos_token=word_tok.EOS, unk_token=word_tok.UNK, pad_token=word_tok.EOS)
  wrong = [w for i, w in enumerate(words) if bpe.tokens(w) != [i]]
  if wrong:
    raise ValueError(f"words {wrong[:5]} do not come out as one BPE token; this vocabulary "
                     "cannot be written as a CLIP tokenizer")
  params = {k: dict(v) if isinstance(v, dict) else v for k, v in text_params.items()}
  emb = params["embeddings"] = dict(params["embeddings"])
  table = np.asarray(emb["token_embedding"]["embedding"], np.float32)
  extra = len(vocab) - table.shape[0]
  emb["token_embedding"] = {"embedding": np.concatenate(
      [table, np.repeat(table[tok.unk_id:tok.unk_id + 1], extra, axis=0)])}
  return bpe, params


def to_diffusers(workdir: str, stage: str, out: str) -> str:
  """Writes stage `stage` of workdir as a diffusers directory `out`; returns a summary line."""
  import jax
  from gdistill import api, diffusers_io, sharding
  from gdistill.clip_tokenizer import CLIPTokenizer
  model = api.load(workdir, stage)
  if not model.text_conditioned or model.latents is None:
    kind = "text" if model.text_conditioned else "class"
    space = "latent" if model.latents is not None else "pixel-space"
    raise ValueError(f"{model.workdir} stage {model.stage} is a {space} {kind}-conditioned "
                     "model; only latent text-to-image models (Stable Diffusion's structure) "
                     "have a diffusers pipeline to go to")
  host = lambda tree: jax.tree.map(lambda a: np.asarray(sharding.to_host(a)), tree)
  params = host(model.params)
  tokenizer, text_params = model.tokenizer, params["text_encoder"]
  from gdistill.tokenizer import WordTokenizer
  if isinstance(tokenizer, WordTokenizer):
    tokenizer, text_params = word_tokenizer_as_bpe(tokenizer, text_params)
  elif not isinstance(tokenizer, CLIPTokenizer):
    raise ValueError(f"{model.workdir} stage {model.stage} has no tokenizer vocabulary "
                     f"({tokenizer!r}: CLIP's token ids without its BPE files); train it with "
                     "--config.text.tokenizer_path=<a CLIP tokenizer/ folder> or from "
                     "--config.init_from=<a diffusers directory>")
  cfg, meta = model.config, model.metadata
  text = dict(cfg.text.to_dict(), vocab_size=tokenizer.vocab_size)
  unet_model = dict(cfg.model.to_dict(), parametrization=meta["parametrization"])
  if jax.process_index() == 0:
    diffusers_io.write(
        out, model=unet_model, text=text, vae=cfg.vae.to_dict(), unet_params=params["unet"],
        text_params=text_params, vae_params=host(model.latents.params),
        scaling_factor=model.latents.scaling_factor, tokenizer=tokenizer,
        schedule=model.schedule, parametrization=meta["parametrization"],
        time_cond_proj_dim=(int(cfg.model.time_cond_proj_dim) if meta["w_conditioned"]
                            else None))
  steps = model.default_steps
  how = (f"guidance_scale = 1 + w, num_inference_steps = {steps} ({steps} NFE)"
         if meta["w_conditioned"] else
         f"guidance_scale = 1 + w, num_inference_steps = N (2 N NFE: a guided teacher)")
  return (f"[export] {model.workdir} stage {model.stage} -> {os.path.abspath(out)} "
          f"(diffusers StableDiffusionPipeline; {how})")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gdistill.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--stage", default="latest",
                      help="'teacher', 'guided', 'progressive_N' or 'latest' (default)")
  parser.add_argument("--format", default="diffusers", choices=FORMATS)
  parser.add_argument("--out", required=True, help="the directory to write")
  args = parser.parse_args(argv)
  if os.path.exists(os.path.join(args.out, "model_index.json")):
    print(f"[export] {args.out} already holds a pipeline; it is overwritten", flush=True)
  try:
    print(to_diffusers(args.workdir, args.stage, args.out), flush=True)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
