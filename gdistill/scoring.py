"""What an evaluation row samples and how its samples are scored.

make_task(config, eval_dir) -> Task: the conditions every row samples (the same for every
model, sampler and w) and score(samples) -> {metric: value}, with the table's columns.

  class models (digits, toy2d, cifar10, imagenet64): labels i % num_classes for
    eval.num_samples samples; FID and IS from the features of a classifier trained here on
    the training set (digits, toy2d) or of the FID Inception, and the class accuracy.
  text models (shapes): held-out captions of the test split: eval.prompts_single
    single-object and eval.prompts_two two-object ones, and for each (colour, shape) a caption
    that names only those two, eval.prompts_per_group times. The attribute classifier
    (gdistill/metrics/attributes.py) reads every sample:
      adh1   single-object adherence: colour, shape, and size and cell where stated, found
      adh2   two-object adherence: both objects' colour and shape, and the relation
      div    diversity: entropy of the (cell, size) the colour-and-shape-only captions'
             samples show, over the real data's (1 = as varied as the data)
      fd     Frechet distance of the classifier's features against the test images
    (and each attribute alone in results.json; adh1_csp: colour, shape and cell without the
    size, the measure issue 14's criterion names).
With several processes each scores its share of the samples and the shares are gathered.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import jax
import numpy as np

from gdistill import dashboard, data, distributed, metrics, paths

CLASSIFIER_DATASETS = ("digits", "toy2d")


@dataclasses.dataclass
class Task:
  """The conditions of every row, the scorer of its samples and the table's columns."""
  name: str                                  # 'class' | 'text'
  cond: np.ndarray                           # labels [n] or token ids [n, L]
  score: Callable[[np.ndarray], dict]        # samples in [-1, 1] -> metrics
  columns: tuple[tuple[str, str, str], ...]  # (metric, header, format)
  feature: str                               # what the Frechet distance is computed on
  quality: str                               # the metric of the quality-vs-NFE plot
  tradeoff: tuple[str, str]                  # (x, y) of the trade-off-over-w plot
  description: str                           # results.md's first paragraph
  prompts: tuple[str, ...] = ()              # text: the caption of every sample


def _process0_first(name: str, compute_or_load: Callable):
  """Runs compute_or_load on process 0 (which computes and caches), then on the others (which
  find the cache): one computation for all processes."""
  out = compute_or_load() if jax.process_index() == 0 else None
  distributed.sync(f"eval:{name}")
  return out if out is not None else compute_or_load()


def _sharded(fn: Callable[[np.ndarray], dict], x: np.ndarray) -> dict:
  """fn on this process's share of x's rows, every output gathered (same on all processes)."""
  part = fn(x[distributed.process_rows(len(x))])
  return {k: distributed.allgather_rows(np.asarray(v), len(x)) for k, v in part.items()}


# ------------------------------------------------------------------------------- class models
def class_task(config, eval_dir: str) -> Task:
  """Labels i % num_classes; FID / IS / accuracy. For Inception datasets the weights are
  loaded first, so a missing file fails before anything is sampled."""
  ref_path = paths.join(eval_dir, "reference_stats.npz")
  if config.data.name in CLASSIFIER_DATASETS:
    x, y = data.load_array(config.data, "train")
    state = _process0_first("classifier", lambda: metrics.get_or_train_classifier(
        paths.join(eval_dir, "classifier.npz"), x, y, int(config.model.num_classes),
        steps=int(config.eval.classifier_steps), seed=int(config.seed)))
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state.params):
      digest.update(np.ascontiguousarray(leaf).tobytes())
    fn = lambda s: metrics.classifier_features(state, s)
    key, feature = f"classifier:{digest.hexdigest()[:16]}", "classifier"
  else:
    try:
      params = metrics.load_inception_params(config.eval.inception_weights)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e} Set --config.eval.inception_weights=PATH.") from None
    fn = lambda s: metrics.inception_features(params, s)
    x, key, feature = None, f"inception:{config.data.name}:train", "inception"
  mu, sigma = _process0_first("reference_stats", lambda: metrics.reference_stats(
      ref_path, lambda: fn(x if x is not None else data.load_array(config.data, "train")[0])[0],
      key=key))
  labels = (np.arange(int(config.eval.num_samples)) % int(config.model.num_classes)).astype(
      np.int32)

  def score(samples: np.ndarray) -> dict:
    if samples.ndim == 4:
      samples = dashboard.to_uint8(samples)  # score what a saved image holds, like the refs
    out = _sharded(lambda s: dict(zip(("features", "logits"), fn(s))), samples)
    fid = metrics.frechet_distance(*metrics.feature_stats(out["features"]), mu, sigma)
    acc = (float(np.mean(np.argmax(out["logits"], -1) == labels))
           if feature == "classifier" else None)
    return {"fid": fid, "is": metrics.inception_score(out["logits"], from_logits=True),
            "accuracy": acc}

  return Task("class", labels, score,
              (("fid", "FID", ".2f"), ("is", "IS", ".2f"), ("accuracy", "Acc", ".3f")),
              feature, "fid", ("is", "fid"),
              f"{len(labels)} samples per row and w (labels i % num_classes); FID and IS "
              f"from {feature} features against the training set.")


# -------------------------------------------------------------------------------- text models
def eval_prompts(config, test: dict) -> tuple[np.ndarray, dict]:
  """(indices into the test split, segment sizes): single-object captions, two-object
  captions, then per (colour, shape) one caption naming only those, repeated."""
  e = config.eval
  single = np.flatnonzero(test["num_objects"] == 1)[:int(e.prompts_single)]
  two = np.flatnonzero(test["num_objects"] == 2)[:int(e.prompts_two)]
  plain = ((test["num_objects"] == 1) & ~test["size_stated"][:, 0]
           & ~test["cell_stated"][:, 0])
  groups = []
  for color in np.unique(test["color"][:, 0][plain]):
    for shape in np.unique(test["shape"][:, 0][plain]):
      hits = np.flatnonzero(plain & (test["color"][:, 0] == color)
                            & (test["shape"][:, 0] == shape))
      if hits.size:
        groups.append(np.repeat(hits[:1], int(e.prompts_per_group)))
  diverse = np.concatenate(groups) if groups else np.zeros((0,), np.int64)
  index = np.concatenate([single, two, diverse])
  return index, {"single": len(single), "two": len(two), "diverse": len(diverse)}


def text_task(config, eval_dir: str, tokenizer) -> Task:
  from gdistill.metrics import attributes
  train = data.load_captioned(config.data, "train")
  test = data.load_captioned(config.data, "test")
  state = _process0_first("attributes", lambda: attributes.get_or_train(
      paths.join(eval_dir, "attributes.npz"), train, steps=int(config.eval.classifier_steps),
      seed=int(config.seed)))
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(state.params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  mu, sigma = _process0_first("reference_stats", lambda: metrics.reference_stats(
      paths.join(eval_dir, "reference_stats.npz"),
      lambda: attributes.predict(state, test["image"])["features"],
      key=f"attributes:{digest.hexdigest()[:16]}:test"))
  index, sizes = eval_prompts(config, test)
  attrs = {k: np.asarray(v)[index] for k, v in test.items() if k != "image"}
  s1, s2 = sizes["single"], sizes["single"] + sizes["two"]
  segment = lambda d, lo, hi: {k: v[lo:hi] for k, v in d.items()}
  prompts = tuple(str(c) for c in attrs["caption"])

  def score(samples: np.ndarray) -> dict:
    pred = _sharded(lambda s: attributes.predict(state, dashboard.to_uint8(s)), samples)
    one = attributes.single_object_adherence(segment(pred, 0, s1), segment(attrs, 0, s1))
    two = attributes.two_object_adherence(segment(pred, s1, s2), segment(attrs, s1, s2))
    div = attributes.diversity(segment(pred, s2, len(index)),
                               segment(attrs, s2, len(index)), test)
    fd = metrics.frechet_distance(*metrics.feature_stats(pred["features"]), mu, sigma)
    out = {"adh1": one["all"], "adh2": two["all"], "div": div, "fd": fd}
    out.update({f"adh1_{k}": one[k]
                for k in ("color", "shape", "size", "cell", "strict", "csp")})
    out.update({f"adh2_{k}": two[k] for k in ("both", "relation", "color", "shape")})
    return out

  return Task("text", tokenizer.encode(list(prompts)), score,
              (("adh1", "1-obj", ".3f"), ("adh2", "2-obj", ".3f"), ("div", "div", ".2f"),
               ("fd", "FD", ".2f")),
              "attributes", "fd", ("div", "adh2"),
              f"{len(index)} samples per row and w, from held-out captions of the test split: "
              f"{sizes['single']} single-object (1-obj: colour, shape, and size and cell where "
              f"stated, all found), {sizes['two']} two-object (2-obj: both objects' colour "
              f"and shape and the relation), {sizes['diverse']} for diversity (div: entropy "
              "of the cells and sizes of colour-and-shape-only captions' samples over the "
              "data's; 1 = as varied). FD: Frechet distance of the attribute classifier's "
              "features against the test images. All read by the attribute classifier.",
              prompts)


def make_task(config, eval_dir: str, tokenizer=None) -> Task:
  if config.model.conditioning == "text" and config.data.name != "shapes":
    raise ValueError(
        f"--mode=evaluate scores text-to-image samples with the shapes dataset's attribute "
        f"classifier; data.name={config.data.name!r} has none (a CLIP score / FID against "
        "your images is not implemented). Sample with --mode=sample and judge the images, or "
        "evaluate on configs/shapes.py")
  if config.model.conditioning == "text":
    return text_task(config, eval_dir, tokenizer)
  return class_task(config, eval_dir)
