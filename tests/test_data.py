"""Data package: digits8x8 preparation, determinism, resume, process slices, failures."""
import importlib
import os

import ml_collections
import numpy as np
import pytest

from gdistill import data
from gdistill.data import digits
from gdistill.data import pipeline
from gdistill.data import toy2d


def _cfg(name: str, data_dir: str = "", **overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name=name, data_dir=data_dir, split="train", random_flip=False, num_classes=4))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
  """digits8x8 prepared once for the whole session."""
  path = str(tmp_path_factory.mktemp("tfds"))
  data.dataset_info(_cfg("digits", path))
  return path


def _take(loader, n: int) -> list[tuple[int, dict]]:
  with loader:
    return [next(loader) for _ in range(n)]


def test_digits_prepares_from_sklearn(digits_dir):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  cfg = _cfg("digits", digits_dir)
  assert data.dataset_info(cfg) == data.DatasetInfo("digits", (8, 8, 1), 10, 1797)
  images, labels = data.load_array(cfg)
  reference = datasets.load_digits()
  assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
  np.testing.assert_array_equal(images[..., 0], digits.to_uint8(reference.images))
  np.testing.assert_array_equal(labels, reference.target)
  assert labels.dtype == np.int32
  assert digits.to_uint8(np.array([0, 8, 16])).tolist() == [0, 128, 255]

  batch = data.global_batch(cfg, global_batch_size=64, seed=0, step=3)
  assert batch["x"].dtype == np.float32 and batch["x"].shape == (64, 8, 8, 1)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (64,)
  assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
  assert batch["x"].min() == -1.0 and batch["x"].max() == 1.0


def test_preparing_embedded_data_leaves_no_temp_dirs(tmp_path, monkeypatch):
  """tfds looks for a prepared dataset's metadata on its GCS bucket through an empty temp
  dir it never removes; embedded data has none there and must not leave such dirs."""
  import tempfile  # pylint: disable=g-import-not-at-top
  temp = tmp_path / "system_temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  data_dir = tmp_path / "data"
  assert data.dataset_info(_cfg("digits", str(data_dir))).num_examples == 1797
  assert any(data_dir.iterdir())
  assert not list(temp.iterdir())


def test_digits_module_reimports():
  importlib.reload(digits)
  importlib.reload(digits)
  assert digits.Digits8x8.name == "digits8x8"


def test_resume_matches_uninterrupted_run(digits_dir):
  cfg = _cfg("digits", digits_dir, random_flip=True)
  kwargs = dict(global_batch_size=48, seed=7)
  straight = _take(data.make_loader(cfg, start_step=0, **kwargs), 6)
  resumed = _take(data.make_loader(cfg, start_step=4, prefetch=1, **kwargs), 2)
  assert [s for s, _ in straight] == list(range(6))
  assert [s for s, _ in resumed] == [4, 5]
  for (step, want), (_, got) in zip(straight[4:], resumed):
    expected = data.global_batch(cfg, step=step, **kwargs)
    for key in ("x", "label"):
      np.testing.assert_array_equal(got[key], want[key])
      np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("name", ["digits", "toy2d"])
def test_process_slices_concatenate_to_global_batch(digits_dir, name):
  cfg = _cfg(name, digits_dir if name == "digits" else "")
  kwargs = dict(global_batch_size=32, seed=3, start_step=5)
  parts = [_take(data.make_loader(cfg, process_index=i, process_count=2, **kwargs), 2)
           for i in range(2)]
  for k, step in enumerate((5, 6)):
    expected = data.global_batch(cfg, global_batch_size=32, seed=3, step=step)
    for key in ("x", "label"):
      assert parts[0][k][1][key].shape[0] == 16
      got = np.concatenate([parts[0][k][1][key], parts[1][k][1][key]])
      np.testing.assert_array_equal(got, expected[key])


def test_seeds_and_steps_differ(digits_dir):
  cfg = _cfg("digits", digits_dir)
  a = data.global_batch(cfg, global_batch_size=32, seed=0, step=0)
  b = data.global_batch(cfg, global_batch_size=32, seed=1, step=0)
  c = data.global_batch(cfg, global_batch_size=32, seed=0, step=1)
  assert not np.array_equal(a["x"], b["x"])
  assert not np.array_equal(a["x"], c["x"])


def test_every_example_once_per_epoch(digits_dir):
  # 1797 = 3 * 599: with B = 599 epoch e is exactly steps 3e..3e+2; with
  # B = 100 batches straddle the epoch boundary at position 1797.
  images, _ = data.load_array(_cfg("digits", digits_dir))
  unique = len({img.tobytes() for img in images})  # Some images are duplicates.
  order = pipeline._EpochOrder(1797, seed=5)
  for epoch in range(2):
    positions = np.arange(epoch * 1797, (epoch + 1) * 1797)
    assert sorted(order.indices(positions).tolist()) == list(range(1797))
  cfg = _cfg("digits", digits_dir)
  batches = [data.global_batch(cfg, global_batch_size=599, seed=5, step=s)
             for s in range(6)]
  for epoch in range(2):
    x = np.concatenate([b["x"] for b in batches[3 * epoch:3 * epoch + 3]])
    seen = {np.rint((v + 1.0) * 127.5).astype(np.uint8).tobytes() for v in x}
    assert len(seen) == unique
  first, second = (np.concatenate([b["label"] for b in batches[i:i + 3]]) for i in (0, 3))
  assert not np.array_equal(first, second)  # A fresh permutation each epoch.
  straddle = np.concatenate([data.global_batch(cfg, global_batch_size=100, seed=5,
                                               step=s)["label"] for s in range(36)])
  np.testing.assert_array_equal(straddle[:1797], first)
  np.testing.assert_array_equal(straddle[1797:3594], second[:1797])


def test_random_flip_mirrors_width(digits_dir):
  plain = data.global_batch(_cfg("digits", digits_dir), global_batch_size=64, seed=2, step=1)
  flip = data.global_batch(_cfg("digits", digits_dir, random_flip=True),
                           global_batch_size=64, seed=2, step=1)
  np.testing.assert_array_equal(plain["label"], flip["label"])
  same = np.all(plain["x"] == flip["x"], axis=(1, 2, 3))
  mirrored = np.all(plain["x"][:, :, ::-1] == flip["x"], axis=(1, 2, 3))
  assert np.all(same | mirrored) and 10 < np.sum(~same) < 54


def test_toy2d_deterministic_and_labels_match_components():
  cfg = _cfg("toy2d", num_classes=4)
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo("toy2d", (2,), 4, None)
  a = data.global_batch(cfg, global_batch_size=4096, seed=1, step=9)
  b = data.global_batch(cfg, global_batch_size=4096, seed=1, step=9)
  c = data.global_batch(cfg, global_batch_size=4096, seed=1, step=10)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert not np.array_equal(a["x"], c["x"])
  assert a["x"].dtype == np.float32 and a["x"].shape == (4096, 2)
  assert a["label"].dtype == np.int32
  distance = np.linalg.norm(a["x"][:, None] - toy2d.component_means()[None], axis=-1)
  nearest = np.argmin(distance, axis=-1)
  np.testing.assert_array_equal(nearest % 4, a["label"])
  assert np.all(np.min(distance, axis=-1) < 6 * toy2d.STD)
  assert set(np.unique(nearest)) == set(range(8))  # Both modes of every class.
  np.testing.assert_allclose(np.bincount(a["label"]) / 4096, 0.25, atol=0.03)


def test_toy2d_log_prob_normalized():
  grid = np.linspace(-1.6, 1.6, 321)
  xx, yy = np.meshgrid(grid, grid)
  points = np.stack([xx.ravel(), yy.ravel()], axis=-1)
  cell = (grid[1] - grid[0]) ** 2
  for labels in (None, np.full(len(points), 2)):
    mass = np.sum(np.exp(toy2d.log_prob(points, labels, num_classes=3))) * cell
    np.testing.assert_allclose(mass, 1.0, atol=1e-3)


def test_catalog_reader_on_prepared_array_record(digits_dir, monkeypatch):
  # The catalog path (tfds.builder + ArrayRecord random access) over a dataset
  # that is prepared here: digits8x8 under the name 'cifar10'.
  monkeypatch.setitem(pipeline._TFDS_NAMES, "cifar10", digits.NAME)
  pipeline._open_catalog.cache_clear()
  try:
    cfg = _cfg("cifar10", digits_dir, random_flip=True)
    assert data.dataset_info(cfg) == data.DatasetInfo("cifar10", (8, 8, 1), 10, 1797)
    got = _take(data.make_loader(cfg, global_batch_size=40, seed=4, start_step=44), 2)
    for step, batch in got:
      want = data.global_batch(_cfg("digits", digits_dir, random_flip=True),
                               global_batch_size=40, seed=4, step=step)
      np.testing.assert_array_equal(batch["x"], want["x"])
      np.testing.assert_array_equal(batch["label"], want["label"])
  finally:
    pipeline._open_catalog.cache_clear()


def test_unprepared_catalog_dataset_fails_offline(tmp_path, monkeypatch):
  """Refused from the local files alone: any network connection would fail the test."""
  import util
  util.forbid_network(monkeypatch)
  for name, tfds_name in (("cifar10", "cifar10"), ("imagenet64", "imagenet_resized/64x64")):
    with pytest.raises(FileNotFoundError) as error:
      data.make_loader(_cfg(name, str(tmp_path)), global_batch_size=8, seed=0, start_step=0)
    message = str(error.value)
    assert f"tfds build {tfds_name} --data_dir={tmp_path} --file_format=array_record" in message
    assert repr(name) in message and str(tmp_path) in message
    with pytest.raises(FileNotFoundError):
      data.dataset_info(_cfg(name, str(tmp_path)))
  assert "ImageNet account" in message
  assert not any(tmp_path.iterdir())  # Nothing was downloaded or created.


def test_loader_reraises_thread_error():
  def produce(step):
    if step == 2:
      raise KeyError("broken record")
    return {"x": np.zeros((1,), np.float32), "label": np.zeros((1,), np.int32)}

  info = data.DatasetInfo("fake", (1,), 1, None)
  with pipeline.Loader(produce, start_step=0, prefetch=2, info=info) as loader:
    assert [next(loader)[0] for _ in range(2)] == [0, 1]
    with pytest.raises(KeyError, match="broken record"):
      next(loader)
    with pytest.raises(KeyError):  # Stays failed.
      next(loader)
  assert not loader._thread.is_alive()


def test_bad_arguments_are_named(digits_dir):
  with pytest.raises(ValueError, match="data.name='mnist'"):
    data.dataset_info(_cfg("mnist"))
  with pytest.raises(ValueError, match="process_count=3"):
    data.make_loader(_cfg("toy2d"), global_batch_size=8, seed=0, start_step=0,
                     process_count=3)
  with pytest.raises(ValueError, match="random_flip"):
    data.make_loader(_cfg("toy2d", random_flip=True), global_batch_size=8, seed=0,
                     start_step=0)
  with pytest.raises(ValueError, match="num_classes=9"):
    data.dataset_info(_cfg("toy2d", num_classes=9))


# ------------------------------------------------------------- image-caption files (your own)
def _files_cfg(name, data_dir, **overrides):
  fields = dict(num_classes=0, image_size=32, holdout=0, decode_threads=4, variant="")
  fields.update(overrides)
  return _cfg(name, str(data_dir), **fields)


@pytest.fixture(scope="module")
def caption_files(tmp_path_factory):
  """24 shapes images with their captions written both as a folder and as 3 tar shards; the
  last 4 images enlarged 3x and padded to 96x120 (scaled and centre-cropped back when read)."""
  import util
  from gdistill.data import shapes
  d = shapes.generate(24, seed=5)
  images = [im for im in d["image"][:20]] + [
      np.pad(np.repeat(np.repeat(im, 3, axis=0), 3, axis=1), ((0, 0), (12, 12), (0, 0)))
      for im in d["image"][20:]]
  root = tmp_path_factory.mktemp("captions")
  folder = util.write_image_captions(root / "folder", images, d["caption"])
  tars = util.write_image_captions(root / "tars", images, d["caption"], layout="webdataset",
                                   shards=3)
  return {"folder": folder, "tars": tars, "images": d["image"], "captions": d["caption"]}


@pytest.mark.parametrize("name", ["image_folder", "webdataset"])
def test_image_caption_files_serve_images_and_captions(caption_files, name):
  """Your own image-caption files: in path (shard) order, captions as written, an image of the
  training size pixel for pixel, a larger one scaled (shorter side) and centre-cropped."""
  cfg = _files_cfg(name, caption_files["tars" if name == "webdataset" else "folder"])
  info = data.dataset_info(cfg)
  assert (info.shape, info.num_examples, info.captioned) == ((32, 32, 3), 24, True)
  images, captions = data.load_array(cfg)
  assert images.dtype == np.uint8 and images.shape == (24, 32, 32, 3)
  assert list(captions) == [str(c) for c in caption_files["captions"]]
  np.testing.assert_array_equal(images[:20], caption_files["images"][:20])
  # 3x enlarged and padded, then scaled back and cropped: bicubic is close, not exact.
  err = np.abs(images[20:].astype(int) - caption_files["images"][20:].astype(int))
  assert np.mean(err) < 12, np.mean(err)
  # The batches are the loader's usual deterministic, resumable ones: tokens of the captions.
  tok = _EchoTokenizer()
  b = data.global_batch(cfg, global_batch_size=8, seed=3, step=5, tokenizer=tok)
  assert b["x"].shape == (8, 32, 32, 3) and b["tokens"].shape == (8, 1)
  with data.make_loader(cfg, global_batch_size=8, seed=3, start_step=5, tokenizer=tok,
                        process_index=1, process_count=2) as loader:
    step, local = next(loader)
  assert step == 5
  np.testing.assert_array_equal(local["x"], b["x"][4:])
  np.testing.assert_array_equal(local["tokens"], b["tokens"][4:])


def test_folder_and_shards_are_the_same_dataset(caption_files):
  a = data.global_batch(_files_cfg("image_folder", caption_files["folder"]),
                        global_batch_size=16, seed=0, step=2, host_normalize=False,
                        tokenizer=_EchoTokenizer())
  b = data.global_batch(_files_cfg("webdataset", caption_files["tars"]),
                        global_batch_size=16, seed=0, step=2, host_normalize=False,
                        tokenizer=_EchoTokenizer())
  np.testing.assert_array_equal(a["x"], b["x"])
  np.testing.assert_array_equal(a["tokens"], b["tokens"])


class _EchoTokenizer:
  """Caption -> its length (enough to compare which captions a batch holds)."""

  def encode(self, texts):
    return np.asarray([[len(t)] for t in texts], np.int32)


def test_image_caption_holdout_splits(caption_files):
  cfg = _files_cfg("image_folder", caption_files["folder"], holdout=5)
  assert data.dataset_info(cfg).num_examples == 19
  test_cfg = _files_cfg("image_folder", caption_files["folder"], holdout=5, split="test")
  held = data.load_captioned(test_cfg, "test")["caption"]
  train = data.load_array(cfg)[1]
  assert len(held) == 5
  assert sorted(list(held) + list(train)) == sorted(str(c) for c in caption_files["captions"])
  assert data.preview_captions(cfg, 3) == list(held[:3])
  with pytest.raises(ValueError, match="data.holdout > 0"):
    data.dataset_info(_files_cfg("image_folder", caption_files["folder"], split="test"))


def test_image_caption_files_refuse_bad_layouts_by_name(tmp_path, caption_files):
  import shutil
  import util
  from gdistill.data import files
  with pytest.raises(FileNotFoundError, match="no images found"):
    data.dataset_info(_files_cfg("image_folder", tmp_path))
  with pytest.raises(FileNotFoundError, match="no .tar shards"):
    data.dataset_info(_files_cfg("webdataset", tmp_path))
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    data.dataset_info(_files_cfg("image_folder", tmp_path / "nowhere"))
  lost = shutil.copytree(caption_files["folder"], tmp_path / "lost")
  os.remove(lost / "part0" / "00003.txt")
  with pytest.raises(ValueError, match=r"1 of 24 images .* no caption .*part0/00003.png"):
    data.dataset_info(_files_cfg("image_folder", lost))
  broken = shutil.copytree(caption_files["folder"], tmp_path / "broken")
  (broken / "part1" / "00013.png").write_bytes(b"not an image")
  files.open_index.cache_clear()
  with pytest.raises(ValueError, match="cannot decode the image part1/00013.png"):
    data.load_array(_files_cfg("image_folder", broken))
  nocap = util.write_image_captions(tmp_path / "nocap", caption_files["images"][:2], ["a", "b"],
                                    layout="webdataset", shards=1)
  import tarfile
  with tarfile.open(os.path.join(nocap, "shard-00000.tar"), "a") as tar:
    info = tarfile.TarInfo("part1/00009.png")
    info.size = 3
    import io
    tar.addfile(info, io.BytesIO(b"abc"))
  with pytest.raises(ValueError, match="00009 has an image but no part1/00009.txt"):
    data.dataset_info(_files_cfg("webdataset", nocap))
  with pytest.raises(ValueError, match="needs data.image_size"):
    data.dataset_info(_files_cfg("image_folder", caption_files["folder"], image_size=0))
