"""Feature extractors for data without Inception weights: digits8x8 and toy2d.

A small classifier trained here on the real training data stands in for
Inception: its penultimate activations are the FID / precision-recall features
and its logits give the Inception Score. The architecture is chosen from the
shape of one example: images [H, W, C] -> 'cnn' (conv 32 -> conv 64 stride 2 ->
dense 128 features -> logits), points [D] -> 'mlp' (dense 128 -> dense 128
features -> logits). Images are uint8 0..255 or float in [-1, 1]; points float.

Training: Adam, cross-entropy, batches drawn with replacement, one random shift
of at most one pixel per image (edge padded).
A saved classifier is a single .npz (allow_pickle=False): one array per
parameter under 'params/<path>' and the JSON metadata under '__metadata__'.

  state = get_or_train_classifier(workdir + '/classifier.npz', images, labels, 10)
  features, logits = classifier_features(state, samples)
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
from gdistill.metrics import saved

FORMAT = "gdistill-classifier-v1"
FEATURE_DIM = 128


class ImageCNN(nn.Module):
  """[B, H, W, C] in [-1, 1] -> (features [B, 128], logits [B, K])."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, name="conv2")(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(FEATURE_DIM, name="dense")(x))
    return features, nn.Dense(self.num_classes, name="logits")(features)


class PointMLP(nn.Module):
  """[B, D] -> (features [B, 128], logits [B, K])."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(FEATURE_DIM, name="dense1")(x))
    features = nn.relu(nn.Dense(FEATURE_DIM, name="dense2")(x))
    return features, nn.Dense(self.num_classes, name="logits")(features)


_ARCHS = {"cnn": ImageCNN, "mlp": PointMLP}


@dataclasses.dataclass(frozen=True)
class ClassifierState:
  arch: str  # A key of _ARCHS.
  num_classes: int
  data_shape: tuple[int, ...]  # One example: (H, W, C) or (D,).
  params: Any
  metadata: dict[str, Any]  # JSON-serializable: training accuracy, steps, seed, ...


def _arch_for(data_shape: tuple[int, ...]) -> str:
  if len(data_shape) == 3:
    return "cnn"
  if len(data_shape) == 1:
    return "mlp"
  raise ValueError(f"data shape {data_shape}: expected images [H, W, C] or points [D].")


def _model_input(x: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 [-1, 1]; floats pass through as float32."""
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return x.astype(np.float32)


def _fingerprint(x: np.ndarray, labels: np.ndarray) -> str:
  digest = hashlib.sha256(f"{x.dtype}{x.shape}{labels.dtype}".encode())
  digest.update(np.ascontiguousarray(x).tobytes())
  digest.update(np.ascontiguousarray(labels).tobytes())
  return digest.hexdigest()[:16]


def _shift(key: jax.Array, image: jax.Array) -> jax.Array:
  """Translate one image [H, W, C] by -1..1 pixels in each direction."""
  h, w, c = image.shape
  dy, dx = jax.random.randint(key, (2,), 0, 3)
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))


def _loss(params, xb, yb, *, model):
  _, logits = model.apply({"params": params}, xb)
  return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


# A Python loop over a jitted step: XLA:CPU runs convolutions inside a
# lax.scan body ~10x slower than the same step dispatched on its own.
@functools.partial(jax.jit, donate_argnums=(0, 1),
                   static_argnames=("arch", "num_classes", "batch_size", "learning_rate"))
def _train_step(params, opt_state, key, step, x, labels, *, arch, num_classes, batch_size,
                learning_rate):
  model = _ARCHS[arch](num_classes)
  optimizer = optax.adam(learning_rate)
  idx_key, aug_key = jax.random.split(jax.random.fold_in(key, step))
  idx = jax.random.randint(idx_key, (batch_size,), 0, x.shape[0])
  xb, yb = x[idx], labels[idx]
  if arch == "cnn":
    xb = jax.vmap(_shift)(jax.random.split(aug_key, batch_size), xb)
  loss, grads = jax.value_and_grad(functools.partial(_loss, model=model))(params, xb, yb)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("arch", "num_classes"))
def _init(key, x, *, arch, num_classes):
  return _ARCHS[arch](num_classes).init(key, x)["params"]


def _train(key, x, labels, *, arch, num_classes, steps, batch_size, learning_rate):
  """Parameters after `steps` Adam steps, and the last step's loss."""
  init_key, key = jax.random.split(key)
  params = _init(init_key, x[:1], arch=arch, num_classes=num_classes)
  opt_state = optax.adam(learning_rate).init(params)
  loss = jnp.nan
  for step in range(steps):
    params, opt_state, loss = _train_step(
        params, opt_state, key, np.int32(step), x, labels, arch=arch, num_classes=num_classes,
        batch_size=batch_size, learning_rate=learning_rate)
  return params, loss


@functools.partial(jax.jit, static_argnames=("arch", "num_classes"))
def _apply(params, x, *, arch, num_classes):
  return _ARCHS[arch](num_classes).apply({"params": params}, x)


def classifier_features(state: ClassifierState, x, *,
                        batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(features float32 [N, 128], logits float32 [N, K]) of x [N, *data_shape]."""
  x = np.asarray(x)
  if x.shape[1:] != state.data_shape:
    raise ValueError(f"x has shape {x.shape}; the classifier takes [N, *{state.data_shape}].")
  n = x.shape[0]
  size = min(batch_size, n)
  features, logits = [], []
  for lo in range(0, n, size):
    batch = _model_input(x[lo:lo + size])
    keep = batch.shape[0]
    batch = np.concatenate([batch, np.zeros((size - keep,) + batch.shape[1:], batch.dtype)])
    f, l = _apply(state.params, jnp.asarray(batch), arch=state.arch,
                  num_classes=state.num_classes)
    features.append(np.asarray(f)[:keep])
    logits.append(np.asarray(l)[:keep])
  return np.concatenate(features), np.concatenate(logits)


def classifier_accuracy(state: ClassifierState, x, labels) -> float:
  """Fraction of x classified as labels."""
  _, logits = classifier_features(state, x)
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def train_classifier(x, labels, *, num_classes: int, seed: int = 0, steps: int = 400,
                     batch_size: int = 128, learning_rate: float = 2e-3) -> ClassifierState:
  """Trains the classifier for x [N, *shape] (uint8 images, [-1, 1] images or points)."""
  x, labels = np.asarray(x), np.asarray(labels)
  if x.ndim < 2 or labels.shape != x.shape[:1]:
    raise ValueError(f"x {x.shape} and labels {labels.shape}: need [N, ...] and [N].")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels span {labels.min()}..{labels.max()}; num_classes={num_classes}.")
  data_shape = tuple(x.shape[1:])
  arch = _arch_for(data_shape)
  start = time.perf_counter()
  # 'rbg' keys: XLA:CPU compiles the threefry bits for the dense init for ~5 s.
  params, loss = _train(jax.random.key(seed, impl="rbg"), jnp.asarray(_model_input(x)),
                          jnp.asarray(labels, jnp.int32), arch=arch, num_classes=num_classes,
                          steps=steps, batch_size=batch_size, learning_rate=learning_rate)
  params = jax.tree.map(np.asarray, params)
  seconds = time.perf_counter() - start
  metadata = dict(format=FORMAT, arch=arch, num_classes=num_classes, data_shape=list(data_shape),
                  seed=seed, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                  num_examples=int(x.shape[0]), data_fingerprint=_fingerprint(x, labels),
                  final_loss=float(loss), train_seconds=round(seconds, 3))
  state = ClassifierState(arch, num_classes, data_shape, params, metadata)
  metadata["train_accuracy"] = classifier_accuracy(state, x, labels)
  return state


def save_classifier(path: str, state: ClassifierState) -> None:
  """Writes state to path (.npz) atomically: a temporary file, then a rename."""
  saved.save(path, state.params, state.metadata)


def load_classifier(path: str) -> ClassifierState:
  """Reads a classifier saved by save_classifier; checks every parameter's shape."""
  def check(metadata):
    if metadata.get("format") != FORMAT or metadata.get("arch") not in _ARCHS:
      raise ValueError(f"{path!r}: format {metadata.get('format')!r} / arch "
                       f"{metadata.get('arch')!r}; expected {FORMAT!r} / one of "
                       f"{sorted(_ARCHS)}.")
    module = _ARCHS[metadata["arch"]](int(metadata["num_classes"]))
    return (saved.abstract_params(module, (1,) + tuple(metadata["data_shape"])),
            f"the {metadata['arch']!r} architecture")
  params, metadata = saved.load(path, "classifier", check)
  return ClassifierState(metadata["arch"], int(metadata["num_classes"]),
                         tuple(metadata["data_shape"]), params, metadata)


def get_or_train_classifier(cache_path: str, x, labels, num_classes: int,
                            **train_kwargs) -> ClassifierState:
  """The classifier cached at cache_path, trained on (x, labels) and saved first if absent.

  A cached classifier trained on other data (fingerprint, shape or class count)
  raises ValueError rather than being replaced: metrics computed with different
  classifiers are not comparable.
  """
  x, labels = np.asarray(x), np.asarray(labels)
  if paths.exists(cache_path):
    state = load_classifier(cache_path)
    want = dict(num_classes=num_classes, data_shape=list(x.shape[1:]),
                data_fingerprint=_fingerprint(x, labels))
    have = {k: state.metadata.get(k) for k in want}
    if have != want:
      raise ValueError(f"Classifier cache {cache_path!r} was trained for {have}, not {want}; "
                       "delete it to train a new one (metrics will change).")
    return state
  state = train_classifier(x, labels, num_classes=num_classes, **train_kwargs)
  save_classifier(cache_path, state)
  return state
