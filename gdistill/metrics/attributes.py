"""The shapes32 attribute classifier, and caption adherence / diversity of samples.

A small CNN (AttributeCNN) reads a 32x32x3 image (uint8, or float in [-1, 1]) and says,
for each of the 9 cells, what it holds: class 0 = empty or 1 + 3 * colour + shape
(COLORS x SHAPES: a 19-way softmax), and the size of an object there (2-way). Its
penultimate activations, 32 per cell (288-d), are the features of a Frechet distance.

Training: Adam (learning rate cosine-decayed to 0) on the shapes32 train split,
cross-entropy of the 9 cells plus that of the occupied cells' sizes, batches drawn with
replacement, deterministic given the seed. Images are mirrored along x at random (exact:
the shapes are symmetric; the cells are mirrored with them) and perturbed the way
samples of a diffusion model are off: per-image per-channel gain (+-15%), an offset
(+-0.05 in [0, 1] units), a 3x3 box blur mixed in (0..60%) and Gaussian noise (sigma
0..0.05). A saved classifier is one .npz (allow_pickle=False): parameters under
'params/<path>' and the JSON metadata under '__metadata__'.

Decision rule (predict): a cell holds an object iff P(empty) < 0.5; its colour is the
argmax of the colour marginal sum_shape P(colour, shape) over the 18 object classes, its
shape the argmax of the shape marginal (a blurred shape still gets its colour right and
an off colour its shape), its size the argmax of the size head.

The evaluation functions are numpy on such predictions, or on `from_attributes(data)`
(the ground truth in the same form), and the attributes of the captions the samples
were drawn for (generate()'s form, a row per sample):

  state = get_or_train(workdir + '/attributes.npz', shapes.load_split(data_dir, 'train'))
  pred = predict(state, samples)
  single_object_adherence(pred, attrs), two_object_adherence(pred, attrs)
  diversity(pred, attrs, shapes.load_split(data_dir, 'test'))
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdistill import paths

from gdistill.data import shapes
from gdistill.metrics import saved

FORMAT = "gdistill-attribute-classifier-v1"
NUM_CELLS = 9
CELL_FEATURES = 32
FEATURE_DIM = NUM_CELLS * CELL_FEATURES
NUM_CLASSES = 1 + len(shapes.COLORS) * len(shapes.SHAPES)  # 0 = empty.
NUM_SIZES = len(shapes.SIZES)
_MIRROR = np.array([3 * r + 2 - c for r in range(3) for c in range(3)])  # Cell under x -> -x.


class AttributeCNN(nn.Module):
  """[B, 32, 32, 3] in [-1, 1] -> (features [B, 288], cell logits [B, 9, 19],
  size logits [B, 9, 2]).

  Two strided convolutions give an 8x8 map of 4x4-pixel units; a cell's object centre
  lies in units {3r, 3r + 1} x {3c, 3c + 1} (module doc of shapes: the middle half of
  the cell, clipping included). One 4x4 convolution of stride 3 over the map padded by
  one unit reads units 3r-1..3r+2 x 3c-1..3c+2 for cell (r, c): the same weights for
  every cell, so what is learnt about a shape in one cell holds in all of them, and two
  objects never share one global feature vector. Its 9 x 32 activations are the
  features; the logits are per cell linear in them.
  """

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (4, 4), strides=2, name="conv1")(x))  # [B, 16, 16, 32]
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, name="conv2")(x))  # [B, 8, 8, 64]
    h = nn.relu(nn.Conv(CELL_FEATURES, (4, 4), strides=3, padding=((1, 1), (1, 1)),
                        name="cell")(x))  # [B, 3, 3, 32]
    b = h.shape[0]
    cells = nn.Dense(NUM_CLASSES, name="classes")(h).reshape(b, NUM_CELLS, NUM_CLASSES)
    sizes = nn.Dense(NUM_SIZES, name="sizes")(h).reshape(b, NUM_CELLS, NUM_SIZES)
    return h.reshape(b, FEATURE_DIM), cells, sizes


@dataclasses.dataclass(frozen=True)
class AttributeClassifier:
  params: Any
  metadata: dict[str, Any]  # JSON-serializable: seed, steps, accuracy, fingerprint, ...


def cell_targets(data: dict) -> tuple[np.ndarray, np.ndarray]:
  """Per cell: class int32 [N, 9] (0 empty, 1 + 3 * colour + shape) and size int32
  [N, 9] (-1 where empty), from generate()'s attributes."""
  color, shape = np.asarray(data["color"]), np.asarray(data["shape"])
  size, cell = np.asarray(data["size"]), np.asarray(data["cell"])
  n = color.shape[0]
  cls = np.zeros((n, NUM_CELLS), np.int32)
  sizes = np.full((n, NUM_CELLS), -1, np.int32)
  for s in range(color.shape[1]):
    rows = np.nonzero(cell[:, s] >= 0)[0]
    cls[rows, cell[rows, s]] = 1 + len(shapes.SHAPES) * color[rows, s] + shape[rows, s]
    sizes[rows, cell[rows, s]] = size[rows, s]
  return cls, sizes


def _model_input(x: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 [-1, 1]; floats pass through as float32."""
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return x.astype(np.float32)


def _fingerprint(images: np.ndarray, cls: np.ndarray, sizes: np.ndarray) -> str:
  digest = hashlib.sha256(f"{images.dtype}{images.shape}".encode())
  for a in (images, cls, sizes):
    digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()[:16]


def _perturb(key: jax.Array, x: jax.Array) -> jax.Array:
  """Random gain, offset, blur and noise per image of x [B, H, W, C] in [-1, 1]."""
  b = x.shape[0]
  k_gain, k_offset, k_blur, k_sigma, k_noise = jax.random.split(key, 5)
  u = (x + 1.0) * 0.5
  blurred = jax.lax.reduce_window(u, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                  "SAME") / 9.0
  mix = jax.random.uniform(k_blur, (b, 1, 1, 1), maxval=0.6)
  u = (1.0 - mix) * u + mix * blurred
  gain = 1.0 + jax.random.uniform(k_gain, (b, 1, 1, 3), minval=-0.15, maxval=0.15)
  offset = jax.random.uniform(k_offset, (b, 1, 1, 1), minval=-0.05, maxval=0.05)
  sigma = jax.random.uniform(k_sigma, (b, 1, 1, 1), maxval=0.05)
  u = u * gain + offset + sigma * jax.random.normal(k_noise, x.shape)
  return u * 2.0 - 1.0


def _loss(params, x, cls, sizes):
  _, cell_logits, size_logits = AttributeCNN().apply({"params": params}, x)
  cell_loss = optax.softmax_cross_entropy_with_integer_labels(cell_logits, cls).mean()
  occupied = sizes >= 0
  size_ce = optax.softmax_cross_entropy_with_integer_labels(size_logits,
                                                            jnp.maximum(sizes, 0))
  size_loss = jnp.sum(jnp.where(occupied, size_ce, 0.0)) / jnp.maximum(occupied.sum(), 1)
  return cell_loss + size_loss


# A Python loop over a jitted step (see classifier.py: XLA:CPU convolutions in a scan body
# are much slower).
def _optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
  """Adam with the learning rate decayed to 0 along a cosine over the run."""
  return optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))


@functools.partial(jax.jit, donate_argnums=(0, 1),
                   static_argnames=("batch_size", "learning_rate", "steps"))
def _train_step(params, opt_state, key, step, images, cls, sizes, *, batch_size,
                learning_rate, steps):
  idx_key, aug_key = jax.random.split(jax.random.fold_in(key, step))
  idx = jax.random.randint(idx_key, (batch_size,), 0, images.shape[0])
  flip_key, aug_key = jax.random.split(aug_key)
  x = images[idx].astype(jnp.float32) / 127.5 - 1.0
  cls, sizes = cls[idx], sizes[idx]
  # Mirroring along x is exact: the three shapes are symmetric, the sub-pixel grid too.
  flip = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  cls = jnp.where(flip[:, None], cls[:, _MIRROR], cls)
  sizes = jnp.where(flip[:, None], sizes[:, _MIRROR], sizes)
  x = _perturb(aug_key, x)
  loss, grads = jax.value_and_grad(_loss)(params, x, cls, sizes)
  updates, opt_state = _optimizer(learning_rate, steps).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def _init(key, x):
  return AttributeCNN().init(key, x)["params"]


@jax.jit
def _apply(params, x):
  return AttributeCNN().apply({"params": params}, x)


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != (shapes.SIZE, shapes.SIZE, 3):
    raise ValueError(f"images of shape {images.shape}: expected [N, 32, 32, 3] "
                     "(uint8 0..255 or float in [-1, 1]).")
  return images


def logits(state: AttributeClassifier, images, *,
           batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(features [N, 288], cell logits [N, 9, 19], size logits [N, 9, 2]), float32."""
  images = _check_images(images)
  n = images.shape[0]
  size = max(1, min(batch_size, n))
  outs = []
  for lo in range(0, n, size):
    batch = _model_input(images[lo:lo + size])
    keep = batch.shape[0]
    batch = np.concatenate([batch, np.zeros((size - keep,) + batch.shape[1:], np.float32)])
    outs.append([np.asarray(o)[:keep] for o in _apply(state.params, jnp.asarray(batch))])
  if not outs:
    return (np.zeros((0, FEATURE_DIM), np.float32),
            np.zeros((0, NUM_CELLS, NUM_CLASSES), np.float32),
            np.zeros((0, NUM_CELLS, NUM_SIZES), np.float32))
  return tuple(np.concatenate(parts) for parts in zip(*outs))


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def predict(state: AttributeClassifier, images, *, batch_size: int = 1024) -> dict:
  """The objects the classifier finds (module doc's decision rule), per cell:

  present bool [N, 9]; color, shape, size int32 [N, 9] (-1 where empty);
  num_objects int32 [N]; p_empty float32 [N, 9]; features float32 [N, 288].
  """
  features, cell_logits, size_logits = logits(state, images, batch_size=batch_size)
  probs = _softmax(cell_logits.astype(np.float64))
  p_empty = probs[..., 0]
  pair = probs[..., 1:].reshape(probs.shape[:2] + (len(shapes.COLORS), len(shapes.SHAPES)))
  present = p_empty < 0.5
  pred = dict(present=present,
              color=np.argmax(pair.sum(-1), -1).astype(np.int32),
              shape=np.argmax(pair.sum(-2), -1).astype(np.int32),
              size=np.argmax(size_logits, -1).astype(np.int32))
  for k in ("color", "shape", "size"):
    pred[k] = np.where(present, pred[k], -1).astype(np.int32)
  pred.update(num_objects=present.sum(-1).astype(np.int32),
              p_empty=p_empty.astype(np.float32), features=features)
  return pred


def from_attributes(data: dict) -> dict:
  """predict()'s per-cell form of ground-truth attributes (no features; p_empty 0 or 1)."""
  cls, sizes = cell_targets(data)
  present = cls > 0
  color = np.where(present, (cls - 1) // len(shapes.SHAPES), -1).astype(np.int32)
  shape = np.where(present, (cls - 1) % len(shapes.SHAPES), -1).astype(np.int32)
  return dict(present=present, color=color, shape=shape, size=sizes,
              num_objects=present.sum(-1).astype(np.int32),
              p_empty=(~present).astype(np.float32))


def accuracy(state: AttributeClassifier, data: dict) -> dict[str, float]:
  """On labelled data: per_cell (the 19-way class of a cell), object (class and size of an
  occupied cell), image (every cell's class and size right)."""
  pred = predict(state, data["image"])
  truth = from_attributes(data)
  cls_ok = ((pred["present"] == truth["present"]) & (pred["color"] == truth["color"])
            & (pred["shape"] == truth["shape"]))
  ok = cls_ok & (pred["size"] == truth["size"])
  occupied = truth["present"]
  return dict(per_cell=float(cls_ok.mean()), object=float(ok[occupied].mean()),
              image=float(ok.all(-1).mean()))


def train(data: dict, *, seed: int = 0, steps: int = 3000, batch_size: int = 64,
          learning_rate: float = 5e-3, eval_data: dict | None = None) -> AttributeClassifier:
  """Trains on data (generate() / load_split() form: image uint8 and attributes); the
  accuracy() on eval_data, if given, goes into the metadata as 'eval_accuracy'."""
  images = _check_images(data["image"])
  if images.dtype != np.uint8:
    raise ValueError(f"training images must be uint8, not {images.dtype}.")
  cls, sizes = cell_targets(data)
  start = time.perf_counter()
  # 'rbg' keys: XLA:CPU compiles threefry bits for the dense init for seconds.
  key = jax.random.key(seed, impl="rbg")
  init_key, key = jax.random.split(key)
  params = _init(init_key, jnp.zeros((1, shapes.SIZE, shapes.SIZE, 3), jnp.float32))
  opt_state = _optimizer(learning_rate, steps).init(params)
  x, c, s = jnp.asarray(images), jnp.asarray(cls), jnp.asarray(sizes)
  loss = jnp.nan
  for step in range(steps):
    params, opt_state, loss = _train_step(params, opt_state, key, np.int32(step), x, c, s,
                                          batch_size=batch_size,
                                          learning_rate=learning_rate, steps=steps)
  params = jax.tree.map(np.asarray, params)
  metadata = dict(format=FORMAT, feature_dim=FEATURE_DIM, seed=seed, steps=steps, batch_size=batch_size,
                  learning_rate=learning_rate, num_examples=int(images.shape[0]),
                  data_fingerprint=_fingerprint(images, cls, sizes), final_loss=float(loss),
                  train_seconds=round(time.perf_counter() - start, 3))
  state = AttributeClassifier(params, metadata)
  if eval_data is not None:
    metadata["eval_accuracy"] = accuracy(state, eval_data)
  return state


def save(path: str, state: AttributeClassifier) -> None:
  """Writes state to path (.npz) atomically: a temporary file, then a rename."""
  saved.save(path, state.params, state.metadata)


def load(path: str) -> AttributeClassifier:
  """Reads a classifier written by save(); checks the format and every parameter shape."""
  def check(metadata):
    if metadata.get("format") != FORMAT:
      raise ValueError(f"{path!r}: format {metadata.get('format')!r}, expected {FORMAT!r}.")
    return (saved.abstract_params(AttributeCNN(), (1, shapes.SIZE, shapes.SIZE, 3)),
            "AttributeCNN")
  return AttributeClassifier(*saved.load(path, "attribute classifier", check))


def get_or_train(cache_path: str, data: dict, **train_kwargs) -> AttributeClassifier:
  """The classifier cached at cache_path, trained on data and saved first if absent.

  A cache trained on other data (its fingerprint of images and targets) raises
  ValueError rather than being replaced: metrics from different classifiers do not
  compare.
  """
  if paths.exists(cache_path):
    state = load(cache_path)
    want = _fingerprint(_check_images(data["image"]), *cell_targets(data))
    have = state.metadata.get("data_fingerprint")
    if have != want:
      raise ValueError(f"Attribute classifier cache {cache_path!r} was trained on data "
                       f"{have}, not {want}; delete it to train a new one (metrics will "
                       "change).")
    return state
  state = train(data, **train_kwargs)
  save(cache_path, state)
  return state


# ----------------------------------------------------------------------------- evaluation

_ROW, _COL = shapes.cell_row_col(np.arange(NUM_CELLS))
# [relation, cell of A, cell of B]: whether "A <relation> B" holds for those cells.
_RELATION_HOLDS = np.stack([_COL[:, None] < _COL[None, :], _ROW[:, None] < _ROW[None, :]])


def _check_pred(pred: dict, n: int) -> None:
  for key in ("present", "color", "shape", "size"):
    if np.shape(pred[key]) != (n, NUM_CELLS):
      raise ValueError(f"pred[{key!r}] has shape {np.shape(pred[key])}; expected "
                       f"{(n, NUM_CELLS)} (one row per example of attrs, 9 cells).")


def _select(pred: dict, attrs: dict, num_objects: int) -> tuple[dict, dict]:
  n = len(attrs["num_objects"])
  _check_pred(pred, n)
  rows = np.asarray(attrs["num_objects"]) == num_objects
  return ({k: np.asarray(pred[k])[rows] for k in ("present", "color", "shape", "size")},
          {k: np.asarray(attrs[k])[rows] for k in
           ("color", "shape", "size", "cell", "relation", "size_stated", "cell_stated")})


def _found(pred: dict, key: str, value: np.ndarray) -> np.ndarray:
  """bool [n, 9]: the cell holds an object whose `key` is value [n]."""
  return pred["present"] & (pred[key] == value[:, None])


def _rate(hits: np.ndarray) -> float:
  return float(np.mean(hits)) if hits.size else float("nan")


def single_object_adherence(pred: dict, attrs: dict) -> dict[str, float]:
  """Over the single-object captions of attrs (pred: one row per example of attrs).

  all: some found object has the caption's colour and shape, and its size and cell
  where the caption states them; strict: all, and exactly one object found; csp: all but the
  size (colour, shape, and cell where stated: issue 14's criterion). color,
  shape: some found object has that colour (shape); size: some found object has the
  stated size, over captions that state it; cell: the stated cell holds an object, over
  captions that state it; exactly_one: exactly one object found. Counts: n, n_size,
  n_cell. NaN where nothing is counted.
  """
  p, a = _select(pred, attrs, 1)
  color, shape, size, cell = a["color"][:, 0], a["shape"][:, 0], a["size"][:, 0], a["cell"][:, 0]
  size_stated, cell_stated = a["size_stated"][:, 0], a["cell_stated"][:, 0]
  match = _found(p, "color", color) & (p["shape"] == shape[:, None])
  match &= ~cell_stated[:, None] | (np.arange(NUM_CELLS) == cell[:, None])
  csp_ok = match.any(-1)
  match &= ~size_stated[:, None] | (p["size"] == size[:, None])
  all_ok = match.any(-1)
  exactly_one = p["present"].sum(-1) == 1
  in_cell = np.take_along_axis(p["present"], np.maximum(cell, 0)[:, None], -1)[:, 0]
  return dict(
      all=_rate(all_ok), strict=_rate(all_ok & exactly_one), csp=_rate(csp_ok),
      color=_rate(_found(p, "color", color).any(-1)),
      shape=_rate(_found(p, "shape", shape).any(-1)),
      size=_rate(_found(p, "size", size).any(-1)[size_stated]),
      cell=_rate(in_cell[cell_stated]), exactly_one=_rate(exactly_one),
      n=int(len(color)), n_size=int(size_stated.sum()), n_cell=int(cell_stated.sum()))


def two_object_adherence(pred: dict, attrs: dict) -> dict[str, float]:
  """Over the two-object captions "A <relation> B" of attrs (pred: a row per example).

  all: two different found objects have A's and B's colour and shape and their cells
  make the relation true (column of A < column of B for "left of", row of A < row of B
  for "above"); both: two such objects, whatever their cells; relation: all among the
  examples where both holds; a, b: an object with A's (B's) colour and shape; color,
  shape: objects with A's and B's colour (shape) found; exactly_two: exactly two objects
  found. Count: n. NaN where nothing is counted.
  """
  p, a = _select(pred, attrs, 2)
  match = [_found(p, "color", a["color"][:, s]) & (p["shape"] == a["shape"][:, s, None])
           for s in range(2)]
  pairs = match[0][:, :, None] & match[1][:, None, :] & ~np.eye(NUM_CELLS, dtype=bool)
  both = pairs.any((1, 2))
  relation = np.maximum(a["relation"], 0)
  all_ok = (pairs & _RELATION_HOLDS[relation]).any((1, 2))
  return dict(
      all=_rate(all_ok), both=_rate(both), relation=_rate(all_ok[both]),
      a=_rate(match[0].any(-1)), b=_rate(match[1].any(-1)),
      color=_rate(_found(p, "color", a["color"][:, 0]).any(-1)
                  & _found(p, "color", a["color"][:, 1]).any(-1)),
      shape=_rate(_found(p, "shape", a["shape"][:, 0]).any(-1)
                  & _found(p, "shape", a["shape"][:, 1]).any(-1)),
      exactly_two=_rate(p["present"].sum(-1) == 2), n=int(len(relation)))


def _entropy(counts: np.ndarray) -> float:
  """Plug-in entropy (nats) of a histogram (weights need not be integers)."""
  q = counts[counts > 0] / counts.sum()
  return float(-(q * np.log(q)).sum())


def diversity(pred: dict, attrs: dict, reference: dict, *, min_samples: int = 2,
              draws: int = 32, seed: int = 0) -> float:
  """How varied the unstated placement is, 1 = as varied as the reference data.

  Samples (pred, one row per example of attrs) of single-object captions that name only
  colour and shape (no size, no cell) are grouped by that (colour, shape): every wording
  ("a red circle", "red circle", "there is a red circle") of a pair is one group. A
  group's entropy is that of the (cell, size) of the found objects of its colour and
  shape (a sample with k of them adds 1/k to each; one with none is left out, that is
  adherence's business). It is divided by the entropy of the same-sized draws (with
  replacement, `draws` times, mean) from the reference's single-object images of that
  colour and shape, so that both sides carry the same small-sample bias. reference:
  predict() of real images or a dataset's attributes (as generate() returns them).
  Returns the mean ratio over groups of at least min_samples samples (NaN if none).
  """
  p, a = _select(pred, attrs, 1)
  ref = reference if "present" in reference else from_attributes(reference)
  ref_single = np.asarray(ref["present"]).sum(-1) == 1
  ref_cell = np.argmax(np.asarray(ref["present"])[ref_single], -1)
  ref_rows = np.nonzero(ref_single)[0]
  ref_color = np.asarray(ref["color"])[ref_rows, ref_cell]
  ref_shape = np.asarray(ref["shape"])[ref_rows, ref_cell]
  ref_bin = ref_cell * NUM_SIZES + np.asarray(ref["size"])[ref_rows, ref_cell]

  plain = ~a["size_stated"][:, 0] & ~a["cell_stated"][:, 0]
  color, shape = a["color"][:, 0], a["shape"][:, 0]
  match = _found(p, "color", color) & (p["shape"] == shape[:, None])  # [n, 9]
  weight = match / np.maximum(match.sum(-1, keepdims=True), 1)
  bins = np.arange(NUM_CELLS)[None, :] * NUM_SIZES + np.maximum(p["size"], 0)  # [n, 9]
  rng = np.random.default_rng(seed)
  ratios = []
  for c in range(len(shapes.COLORS)):
    for s in range(len(shapes.SHAPES)):
      rows = plain & (color == c) & (shape == s) & match.any(-1)
      n = int(rows.sum())
      pool = ref_bin[(ref_color == c) & (ref_shape == s)]
      if n < min_samples or not pool.size:
        continue
      hist = np.bincount(bins[rows].ravel(), weight[rows].ravel(),
                         minlength=NUM_CELLS * NUM_SIZES)
      ref_entropy = np.mean([_entropy(np.bincount(rng.choice(pool, n), minlength=1))
                             for _ in range(draws)])
      if ref_entropy > 0:
        ratios.append(_entropy(hist) / ref_entropy)
  return float(np.mean(ratios)) if ratios else float("nan")
