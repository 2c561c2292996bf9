"""Metrics: FID / IS / precision-recall math, the digits classifier, the FID Inception."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from gdistill import data
from gdistill import metrics
from gdistill.metrics import inception


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
  """Real digits: (uint8 images, labels, train indices, held-out indices)."""
  cfg = ml_collections.ConfigDict(dict(
      name="digits", data_dir=str(tmp_path_factory.mktemp("tfds")), split="train",
      random_flip=False, num_classes=10))
  images, labels = data.load_array(cfg)
  perm = np.random.default_rng(0).permutation(len(labels))
  return images, labels, perm[:1400], perm[1400:]


@pytest.fixture(scope="session")
def digits_classifier(digits, tmp_path_factory):
  """Trained once per session, through the workdir cache."""
  images, labels, train, _ = digits
  cache = str(tmp_path_factory.mktemp("workdir") / "classifier.npz")
  state = metrics.get_or_train_classifier(cache, images[train], labels[train], 10)
  print(f"\ndigits classifier: {json.dumps(state.metadata)}")
  return state, cache


# ----------------------------------------------------------------------------- FID


def _scipy_fid(f1, f2):
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean))


def test_fid_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  f1 = rng.standard_normal((2000, 64))
  mix = rng.standard_normal((64, 64)) / 8.0
  f2 = 0.3 + rng.standard_normal((2000, 64)) @ (np.eye(64) + mix)
  fid = metrics.fid_from_features(f1.astype(np.float32), f2.astype(np.float32))
  reference = _scipy_fid(f1.astype(np.float32).astype(np.float64),
                         f2.astype(np.float32).astype(np.float64))
  assert abs(fid - reference) <= 1e-4 * reference, (fid, reference)
  mu, sigma = metrics.feature_stats(f1)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (64, 64)
  np.testing.assert_allclose(sigma, np.cov(f1, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid_analytic_and_self():
  # Diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  fid = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert fid == pytest.approx(5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)
  # Rank-deficient covariances (D > N) against themselves.
  f = np.random.default_rng(1).standard_normal((50, 80)).astype(np.float32)
  assert metrics.fid_from_features(f, f) < 1e-3
  with pytest.raises(ValueError, match="sigma2"):
    metrics.frechet_distance(mu1, np.diag(a), mu2, np.eye(4))


def test_fid_digits_halves_vs_noise(digits, digits_classifier):
  images, _, _, _ = digits
  state, _ = digits_classifier
  perm = np.random.default_rng(1).permutation(len(images))
  features, _ = metrics.classifier_features(state, images)
  noise = np.random.default_rng(2).uniform(-1, 1, images.shape).astype(np.float32)
  noise_features, _ = metrics.classifier_features(state, noise)
  assert features.shape == (len(images), 128)
  halves = metrics.fid_from_features(features[perm[:898]], features[perm[898:]])
  vs_noise = metrics.fid_from_features(features, noise_features)
  print(f"\nFID digits halves {halves:.3f}, digits vs noise {vs_noise:.3f}")
  assert metrics.fid_from_features(features, features) < 1e-3
  assert halves < 0.2 * vs_noise


# ----------------------------------------------------------------------------- IS


def test_inception_score_identities():
  k = 10
  one_hot = np.eye(k)[np.arange(1000) % k]
  assert metrics.inception_score(one_hot) == pytest.approx(k, rel=1e-5)
  assert metrics.inception_score(one_hot, splits=4) == pytest.approx(k, rel=1e-5)
  assert metrics.inception_score(np.full((100, k), 1.0 / k)) == pytest.approx(1.0, rel=1e-6)
  logits = np.random.default_rng(0).standard_normal((500, k)) * 3.0
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  assert metrics.inception_score(logits) == pytest.approx(
      metrics.inception_score(probs), rel=1e-5)
  marginal = probs.mean(0)
  kl = np.sum(probs * (np.log(probs) - np.log(marginal)), -1)
  assert metrics.inception_score(logits) == pytest.approx(np.exp(kl.mean()), rel=1e-5)


def test_inception_score_of_real_digits(digits, digits_classifier):
  images, _, _, _ = digits
  _, logits = metrics.classifier_features(digits_classifier[0], images)
  score = metrics.inception_score(logits)
  print(f"\nIS of the real digits: {score:.3f}")
  assert 8.5 < score <= 10.0


# ----------------------------------------------------------------------------- precision/recall


def test_precision_recall_self_and_disjoint():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((600, 16)).astype(np.float32)
  assert metrics.precision_recall(real, real, batch_size=256) == (1.0, 1.0)
  assert metrics.precision_recall(real, real + 100.0, batch_size=256) == (0.0, 0.0)
  # In 2-D, a generator covering one half-plane only: precise, recall about 1/2.
  real, other = rng.standard_normal((2, 1000, 2)).astype(np.float32)
  precision, recall = metrics.precision_recall(real, other[other[:, 0] > 0], k=3)
  assert precision > 0.95 and 0.4 < recall < 0.6, (precision, recall)


# ----------------------------------------------------------------------------- classifier


def test_classifier_held_out_accuracy(digits, digits_classifier):
  images, labels, _, held_out = digits
  state, _ = digits_classifier
  accuracy = metrics.classifier_accuracy(state, images[held_out], labels[held_out])
  print(f"\nheld-out accuracy {accuracy:.4f}, train accuracy "
        f"{state.metadata['train_accuracy']:.4f}, {state.metadata['train_seconds']} s")
  assert accuracy > 0.95
  assert state.metadata["train_accuracy"] > 0.97


def test_classifier_cache_round_trip(digits, digits_classifier, tmp_path):
  images, labels, train, _ = digits
  state, cache = digits_classifier
  loaded = metrics.get_or_train_classifier(cache, images[train], labels[train], 10)
  assert loaded.metadata == state.metadata and loaded.data_shape == (8, 8, 1)
  np.testing.assert_array_equal(metrics.classifier_features(loaded, images[:300])[1],
                                metrics.classifier_features(state, images[:300])[1])
  path = str(tmp_path / "copy.npz")
  metrics.save_classifier(path, state)
  with np.load(path, allow_pickle=False) as npz:  # No object arrays anywhere.
    assert all(npz[k].dtype != object for k in npz.files)
  np.testing.assert_array_equal(metrics.classifier_features(metrics.load_classifier(path),
                                                            images)[1],
                                metrics.classifier_features(state, images)[1])
  with pytest.raises(ValueError, match="delete it"):  # Other data: never silently reused.
    metrics.get_or_train_classifier(cache, images[:100], labels[:100], 10)
  with pytest.raises(FileNotFoundError, match="nothing.npz"):
    metrics.load_classifier(str(tmp_path / "nothing.npz"))


def test_toy2d_classifier():
  points, labels = data.sample_toy2d(np.random.default_rng(0), 2000, 4)
  state = metrics.train_classifier(points, labels, num_classes=4, steps=200)
  test_points, test_labels = data.sample_toy2d(np.random.default_rng(1), 1000, 4)
  assert state.arch == "mlp"
  assert metrics.classifier_accuracy(state, test_points, test_labels) > 0.97


# ----------------------------------------------------------------------------- reference stats


def test_reference_stats_cache(tmp_path):
  features = np.random.default_rng(0).standard_normal((100, 5))
  calls = []

  def compute():
    calls.append(1)
    return features

  path = str(tmp_path / "ref" / "stats.npz")
  mu, sigma = metrics.reference_stats(path, compute, feature_dim=5, key="a")
  again = metrics.reference_stats(path, compute, feature_dim=5, key="a")
  assert len(calls) == 1
  np.testing.assert_array_equal(again[0], mu)
  np.testing.assert_array_equal(again[1], sigma)
  metrics.reference_stats(path, compute, feature_dim=5, key="b")  # Stale key.
  assert len(calls) == 2
  with open(path, "wb") as f:
    f.write(b"truncated")
  _, sigma_again = metrics.reference_stats(path, compute, feature_dim=5, key="b")
  assert len(calls) == 3 and sigma_again.shape == (5, 5)
  with pytest.raises(ValueError, match="expected"):
    metrics.reference_stats(str(tmp_path / "x.npz"), lambda: features, feature_dim=6)


# ----------------------------------------------------------------------------- Inception


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_inception_shapes_and_parameter_count():
  shapes = inception.init_shapes()
  # torchvision inception_v3: 27,161,264 with the aux head (3,326,696) and a
  # 1000-way fc; the FID variant has no aux head and a 1008-way fc (+16,392).
  assert _count(shapes["params"]) == 27_161_264 - 3_326_696 + 8 * 2048 + 8 == 23_850_960
  assert _count(shapes["batch_stats"]) == 34_432
  images = jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.uint8)
  pool, logits = jax.eval_shape(inception._apply, shapes, images)
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)


def test_inception_torch_names_convert():
  shapes = inception.init_shapes()
  names = {}
  for collection, tree in shapes.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = tuple(p.key for p in path)
      name, transpose = inception._torch_name(collection, keys)
      shape = leaf.shape if transpose is None else tuple(
          leaf.shape[transpose.index(i)] for i in range(len(transpose)))
      names[name] = shape
  assert len(names) == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 bn tensors), fc weight/bias.
  assert names["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert names["Mixed_6b.branch7x7dbl_5.conv.weight"] == (192, 128, 1, 7)
  assert names["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
  assert names["fc.weight"] == (1008, 2048)
  state = {k: np.broadcast_to(np.float32(0), s) for k, s in names.items()}
  state["Conv2d_1a_3x3.conv.weight"] = np.arange(32 * 27, dtype=np.float32).reshape(32, 3, 3, 3)
  state["fc.weight"] = np.arange(1008 * 2048, dtype=np.float32).reshape(1008, 2048)
  variables = inception.variables_from_torch(state)
  kernel = variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]
  assert kernel.shape == (3, 3, 3, 32) and kernel[2, 1, 0, 5] == state[
      "Conv2d_1a_3x3.conv.weight"][5, 0, 2, 1]
  assert variables["params"]["fc"]["kernel"][7, 3] == state["fc.weight"][3, 7]
  del state["fc.bias"]
  with pytest.raises(ValueError, match="fc.bias"):
    inception.variables_from_torch(state)


def test_inception_pools_match_tensorflow():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  avg = inception._avg_pool_same(x)[0, :, :, 0]
  assert avg[0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)  # Padded zeros not counted.
  assert avg[1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))
  x = jnp.full((1, 8, 8, 2048), -1.0)
  out = jax.eval_shape(lambda v: inception.InceptionE(max_pool=True).init_with_output(
      jax.random.key(0), v), x)[0]
  assert out.shape == (1, 8, 8, 2048)


def test_inception_missing_weights(tmp_path):
  path = str(tmp_path / "pt_inception.npz")
  with pytest.raises(FileNotFoundError) as error:
    metrics.load_inception_params(path)
  assert path in str(error.value) and "pt_inception-2015-12-05" in str(error.value)


@pytest.mark.slow
def test_inception_forward_runs():
  """Random weights: the whole network runs on uint8 and [-1, 1] inputs (~1 min on CPU)."""
  variables = jax.jit(inception.FIDInceptionV3().init)(
      jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  pool, logits = metrics.inception_features(variables, images, batch_size=2)
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert np.all(np.isfinite(pool)) and np.all(pool >= 0.0)  # Mean of relu outputs.
  scaled = images.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(metrics.inception_features(variables, scaled, batch_size=2)[0],
                             pool, rtol=1e-5, atol=1e-6)
