"""2-D class-conditional toy data: 8 Gaussians on the unit circle.

Component k (k = 0..7) is N(mu_k, STD^2 I) with mu_k = (cos(2 pi k / 8),
sin(2 pi k / 8)). Class c owns the components with k % num_classes == c and is
a uniform mixture of them; classes are uniform. With 4 classes each class is
a pair of opposite modes, so the unconditional density hides what guidance has
to recover.
"""
import numpy as np

NUM_COMPONENTS = 8
RADIUS = 1.0
STD = 0.08


def component_means() -> np.ndarray:
  """mu_k, float64 [8, 2]."""
  angles = np.arange(NUM_COMPONENTS) * (2.0 * np.pi / NUM_COMPONENTS)
  return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def component_classes(num_classes: int) -> np.ndarray:
  """Owner class of each component, int32 [8]: k % num_classes."""
  _check_num_classes(num_classes)
  return (np.arange(NUM_COMPONENTS) % num_classes).astype(np.int32)


def _check_num_classes(num_classes: int) -> None:
  if not 1 <= num_classes <= NUM_COMPONENTS:
    raise ValueError(
        f"toy2d num_classes={num_classes}: must be in 1..{NUM_COMPONENTS} "
        "so that every class owns at least one of the 8 components.")


def sample_toy2d(rng: np.random.Generator, n: int,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """n draws of (x, c): c ~ U{0..C-1}, k ~ U{k : k % C == c}, x ~ N(mu_k, STD^2 I).

  Returns points float32 [n, 2] and labels int32 [n].
  """
  owners = component_classes(num_classes)
  labels = rng.integers(0, num_classes, size=n)
  # Components of class c are c, c + C, c + 2C, ... < 8.
  counts = np.bincount(owners, minlength=num_classes)
  slot = np.floor(rng.random(n) * counts[labels]).astype(np.int64)
  components = labels + num_classes * slot
  noise = rng.standard_normal((n, 2))
  points = component_means()[components] + STD * noise
  assert points.shape == (n, 2), points.shape
  return points.astype(np.float32), labels.astype(np.int32)


def log_prob(points: np.ndarray, labels: np.ndarray | None,
             num_classes: int) -> np.ndarray:
  """log p(x | c) (or log p(x) when labels is None), float64 [n]."""
  points = np.asarray(points, np.float64)
  assert points.ndim == 2 and points.shape[-1] == 2, points.shape
  owners = component_classes(num_classes)
  sq = np.sum((points[:, None, :] - component_means()[None]) ** 2, axis=-1)
  log_normal = -0.5 * sq / STD**2 - np.log(2.0 * np.pi * STD**2)  # [n, 8]
  if labels is None:
    # p(k) = p(c) p(k | c) = 1/C * 1/count(c).
    counts = np.bincount(owners, minlength=num_classes)
    log_weight = -np.log(num_classes) - np.log(counts[owners])
    log_weight = np.broadcast_to(log_weight, log_normal.shape)
  else:
    labels = np.asarray(labels)
    assert labels.shape == points.shape[:1], (labels.shape, points.shape)
    member = owners[None, :] == labels[:, None]  # [n, 8]
    counts = member.sum(axis=-1, keepdims=True)
    log_weight = np.where(member, -np.log(np.maximum(counts, 1)), -np.inf)
  joint = log_normal + log_weight
  top = np.max(joint, axis=-1, keepdims=True)
  return (top + np.log(np.sum(np.exp(joint - top), axis=-1, keepdims=True)))[:, 0]
