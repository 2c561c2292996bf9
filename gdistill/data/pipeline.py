"""Input pipeline: deterministic global batches, sliced per process, prefetched.

The global batch at step s is a pure function of (dataset, seed, s):
  * finite datasets (N examples): position p = s * B + j (j < B) is example
    perm_e[p % N] of epoch e = p // N, perm_e = default_rng([seed, e]).permutation(N);
    the optional horizontal flip of position j is drawn from
    default_rng([seed, s, 1]), so it too depends only on (seed, s, j);
  * toy2d (infinite): sample_toy2d(default_rng([seed, s]), B, num_classes).
Process i of P receives rows [i * B / P, (i + 1) * B / P) of that batch, so a run
resumed at step k sees exactly the batches an uninterrupted run sees, whatever
the process count.

  with make_loader(config.data, global_batch_size=B, seed=0, start_step=k) as loader:
    for step, batch in loader:  # batch = {'x': f32 [B/P, ...] in [-1, 1], 'label': i32 [B/P]}
      ...

With host_normalize=False (config.data.normalize_on_device) image batches leave the loader
thread as uint8 {'x': u8 [B/P, H, W, C], 'label', 'flip': bool [B/P] (with random_flip)}: a
quarter of the bytes, and no float work in the loader thread. finish_batch, jitted on the
device, turns them into exactly the host path's float32 batch: it looks each pixel up in the
256 values normalize() gives on the host, and mirrors W where 'flip'.
"""
import dataclasses
import functools
import queue
import threading
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from gdistill import paths
from gdistill.data import digits
from gdistill.data import embedded
from gdistill.data import files
from gdistill.data import toy2d

_TFDS_NAMES = {
    "digits": digits.NAME,
    "cifar10": "cifar10",
    "imagenet64": "imagenet_resized/64x64",
}
_NAMES = ("toy2d", "shapes") + tuple(_TFDS_NAMES) + files.KINDS
_DEFAULT_DATA_DIR = "~/tensorflow_datasets"
_FLIP_STREAM = 1  # default_rng([seed, step, 1]); [seed, epoch] is the permutation.
_TOY2D_REFERENCE_SIZE = 10_000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  shape: tuple[int, ...]  # Per example: (H, W, C) for images, (2,) for toy2d.
  num_classes: int  # 0 for a captioned dataset.
  num_examples: int | None  # None for an infinite (sampled) dataset.
  # The words of a captioned dataset's captions; () for free text (image-caption files).
  vocabulary: tuple[str, ...] | None = None

  @property
  def captioned(self) -> bool:
    return self.vocabulary is not None


@dataclasses.dataclass(frozen=True)
class _Source:
  info: DatasetInfo
  # Example indices -> (uint8 [n, H, W, C], int32 [n] labels or str [n] captions); None for
  # toy2d.
  fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None


def _data_dir(data_cfg) -> str:
  return paths.resolve(data_cfg.data_dir or _DEFAULT_DATA_DIR)


def _open(data_cfg, split: str | None = None) -> _Source:
  """The dataset data_cfg names; `split` overrides data_cfg.split."""
  split = data_cfg.split if split is None else split
  if data_cfg.name not in _NAMES:
    raise ValueError(f"data.name={data_cfg.name!r} is not a dataset; valid: {_NAMES}.")
  if data_cfg.name == "toy2d":
    toy2d.component_classes(data_cfg.num_classes)  # Validates num_classes.
    return _Source(DatasetInfo("toy2d", (2,), int(data_cfg.num_classes), None))
  if data_cfg.name == "digits":
    return _open_digits(_data_dir(data_cfg), split)
  if data_cfg.name == "shapes":
    return _open_shapes(_data_dir(data_cfg), split, data_cfg.variant or "full")
  if data_cfg.name in files.KINDS:
    return _open_files(data_cfg.name, paths.resolve(data_cfg.data_dir) if data_cfg.data_dir
                       else "", split, int(data_cfg.image_size), int(data_cfg.holdout),
                       int(data_cfg.decode_threads))
  return _open_catalog(data_cfg.name, _data_dir(data_cfg), split)


@functools.lru_cache(maxsize=4)
def _open_digits(data_dir: str, split: str) -> _Source:
  """Prepares digits8x8 in data_dir if needed, then holds it in memory."""
  builder = embedded.prepare(
      lambda: digits.Digits8x8(data_dir=data_dir, file_format="array_record"))
  images, labels = _read_all(builder.as_data_source(split=split))
  images.flags.writeable = False
  labels.flags.writeable = False
  info = DatasetInfo("digits", images.shape[1:], 10, len(labels))
  return _Source(info, lambda idx: (images[idx], labels[idx]))


@functools.lru_cache(maxsize=4)
def _open_shapes(data_dir: str, split: str, variant: str) -> _Source:
  """shapes32 (gdistill/data/shapes.py): prepared in data_dir if needed, held in memory."""
  from gdistill.data import shapes
  d = shapes.load_split(data_dir, split, config=variant)
  images, captions = d["image"], d["caption"]
  info = DatasetInfo("shapes", images.shape[1:], 0, len(images), tuple(shapes.VOCAB))
  return _Source(info, lambda idx: (images[idx], captions[idx]))


@functools.lru_cache(maxsize=8)
def _open_files(kind: str, root: str, split: str, image_size: int, holdout: int,
                threads: int) -> _Source:
  """An image-caption folder or webdataset shards (gdistill/data/files.py): indexed once,
  images decoded and centre-cropped to image_size when fetched."""
  if image_size < 1:
    raise ValueError(f"data.name={kind!r} needs data.image_size (the training resolution: "
                     "vae.image_size for a latent model, model.image_size in pixel space)")
  index = files.open_index(kind, root)
  rows = files.split_indices(len(index), split, holdout)
  info = DatasetInfo(kind, (image_size, image_size, 3), 0, len(rows), vocabulary=())
  return _Source(info, lambda idx: files.read(index, rows[idx], image_size, threads))


def streams_images(data_cfg) -> bool:
  """Whether the dataset is read from files batch by batch (image-caption files) rather than
  held in memory: a latent model then encodes each batch on the device instead of caching
  the latents of the whole split (autoencoding.encode_split)."""
  return data_cfg.name in files.KINDS


def _not_prepared(name: str, tfds_name: str, data_dir: str, why: str) -> str:
  message = (
      f"Dataset {name!r} (tfds {tfds_name!r}) {why} in data_dir={data_dir!r}. "
      "gdistill never downloads at training time; prepare it once with:\n"
      f"  tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record")
  if tfds_name.startswith("imagenet_resized"):
    message += (
        "\nimagenet_resized needs the ImageNet download: its builder fetches "
        "Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and "
        "Imagenet64_val_npz.zip from image-net.org/data/downsample, which needs "
        "an ImageNet account (https://image-net.org/download-images). Build it "
        "where that works, then copy the imagenet_resized/ folder into data_dir.")
  return message


@functools.lru_cache(maxsize=4)
def _open_catalog(name: str, data_dir: str, split: str) -> _Source:
  """Random access (ArrayRecord) to a dataset already prepared in data_dir."""
  tfds_name = _TFDS_NAMES[name]
  # try_gcs=False: never look up gs://tfds-data; the builder only reads files.
  builder = tfds.builder(tfds_name, data_dir=data_dir, try_gcs=False,
                         file_format="array_record")
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared(
        name, tfds_name, data_dir, f"is not prepared (no {builder.data_path})"))
  formats = builder.info.available_file_formats()
  if tfds.core.FileFormat.ARRAY_RECORD not in formats:
    raise FileNotFoundError(_not_prepared(
        name, tfds_name, data_dir,
        f"is prepared only as {sorted(f.value for f in formats)}, without the "
        "random-access array_record files"))
  source = builder.as_data_source(split=split)
  features = builder.info.features
  info = DatasetInfo(name, tuple(features["image"].shape),
                     features["label"].num_classes, len(source))

  def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _stack(source.__getitems__(idx.tolist()))

  return _Source(info, fetch)


def _stack(examples: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
  labels = np.asarray([e["label"] for e in examples], np.int32)
  return images, labels


def _read_all(source, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  parts = [_stack(source.__getitems__(list(range(lo, min(lo + chunk, len(source))))))
           for lo in range(0, len(source), chunk)]
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]))


class _EpochOrder:
  """Position p -> example perm_{p // N}[p % N]; keeps the last two epochs."""

  def __init__(self, num_examples: int, seed: int):
    self._n = num_examples
    self._seed = seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        del self._perms[min(self._perms)]
      rng = np.random.default_rng([self._seed, epoch])
      self._perms[epoch] = rng.permutation(self._n)
    return self._perms[epoch]

  def indices(self, positions: np.ndarray) -> np.ndarray:
    epochs = positions // self._n
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
      rows = epochs == epoch
      out[rows] = self._perm(int(epoch))[positions[rows] % self._n]
    return out


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]: images / 127.5 - 1 in IEEE float32 (the host path)."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# normalize() of every uint8 value: the device path looks pixels up here. XLA does not evaluate
# x / 127.5 - 1 as numpy does: its simplifier turns the division into x * (1 / 127.5) (jax
# 0.10.2 on CPU: up to 126 ulp off near 0, and 1.0000001 at 255, outside [-1, 1]).
_LEVELS = normalize(np.arange(256, dtype=np.uint8))


def normalize_on_device(images):
  """normalize() for a uint8 jax array under jit, bit for bit: a lookup of the host's 256
  values (no device arithmetic to round differently)."""
  return jnp.take(jnp.asarray(_LEVELS), images.astype(jnp.int32), mode="clip")


def _flip_mask(seed: int, step: int, global_batch_size: int, lo: int, hi: int) -> np.ndarray:
  rng = np.random.default_rng([seed, step, _FLIP_STREAM])
  return (rng.random(global_batch_size) < 0.5)[lo:hi]


def _reader(data_cfg, source: _Source, *, global_batch_size: int, seed: int,
            lo: int, hi: int, host_normalize: bool = True, tokenizer=None,
            examples: np.ndarray | None = None) -> Callable[[int], dict[str, np.ndarray]]:
  """step -> rows [lo, hi) of the global batch at that step.

  host_normalize=False: image datasets give uint8 'x' and, with random_flip, the bool 'flip'
  mask for finish_batch (toy2d's points are float32 either way). Captioned datasets give
  'tokens' (tokenizer.encode of the captions, int32 [b, L]) where the others give 'label'.
  examples: float32 [N, ...] in dataset order (a latent model's encoded images) served as 'x'
  instead of the images.
  """
  if examples is not None:
    if len(examples) != source.info.num_examples or data_cfg.random_flip:
      raise ValueError(f"examples for {len(examples)} rows, the dataset has "
                       f"{source.info.num_examples} (and random_flip must be off)")
    fetch = source.fetch
    source = dataclasses.replace(
        source, info=dataclasses.replace(source.info, shape=tuple(examples.shape[1:])),
        fetch=lambda idx: (examples[idx], fetch(idx)[1]))
    host_normalize = True
  if source.info.captioned and tokenizer is None:
    raise ValueError(f"dataset {source.info.name!r} has captions: pass the model's tokenizer")
  if global_batch_size < 1 or seed < 0:
    raise ValueError(f"global_batch_size={global_batch_size}, seed={seed}: "
                     "need global_batch_size >= 1 and seed >= 0.")
  flip_images = bool(data_cfg.random_flip)
  if source.fetch is None:
    if flip_images:
      raise ValueError("data.random_flip=True is only valid for image datasets, "
                       f"not data.name={data_cfg.name!r}.")

    def sample(step: int) -> dict[str, np.ndarray]:
      rng = np.random.default_rng([seed, step])
      points, labels = toy2d.sample_toy2d(rng, global_batch_size, source.info.num_classes)
      return {"x": points[lo:hi], "label": labels[lo:hi]}
    return sample

  order = _EpochOrder(source.info.num_examples, seed)

  def cond(values: np.ndarray) -> dict[str, np.ndarray]:
    if source.info.captioned:
      return {"tokens": tokenizer.encode([str(c) for c in values])}
    return {"label": values.astype(np.int32)}

  def read(step: int) -> dict[str, np.ndarray]:
    positions = step * global_batch_size + np.arange(lo, hi, dtype=np.int64)
    images, values = source.fetch(order.indices(positions))
    assert images.shape == (hi - lo, *source.info.shape), images.shape
    if not host_normalize:
      out = {"x": np.asarray(images, np.uint8), **cond(values)}
      if flip_images:
        out["flip"] = _flip_mask(seed, step, global_batch_size, lo, hi)
      return out
    x = images if images.dtype == np.float32 else normalize(images)
    if flip_images:
      flip = _flip_mask(seed, step, global_batch_size, lo, hi)
      x[flip] = x[flip][:, :, ::-1]  # [b, H, W, C]: mirror W.
    return {"x": x, **cond(values)}
  return read


def finish_batch(batch: dict) -> dict:
  """The device half of a host_normalize=False batch (trace it under jax.jit): uint8 'x' ->
  normalize_on_device(x), then mirrored along W where 'flip' (the key is consumed). A float
  'x' (toy2d, or a batch the host already normalized) is left as it is, flip aside."""
  out = dict(batch)
  x = out["x"]
  if x.dtype == jnp.uint8:
    x = normalize_on_device(x)
  flip = out.pop("flip", None)
  if flip is not None:
    x = jnp.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)
  out["x"] = x
  return out


def needs_finish(batch: dict) -> bool:
  """Whether finish_batch would change the batch (uint8 images or a flip mask)."""
  return "flip" in batch or batch["x"].dtype == np.uint8


def dataset_info(data_cfg) -> DatasetInfo:
  """Shape, classes and size (digits: prepared on first use; catalog: must exist)."""
  return _open(data_cfg).info


def global_batch(data_cfg, *, global_batch_size: int, seed: int, step: int,
                 host_normalize: bool = True, tokenizer=None) -> dict[str, np.ndarray]:
  """The whole global batch at `step`: {'x': f32 [B, ...], 'label': i32 [B]} (host_normalize
  False: the uint8 form, see the module doc; captioned datasets: 'tokens')."""
  return _reader(data_cfg, _open(data_cfg), global_batch_size=global_batch_size,
                 seed=seed, lo=0, hi=global_batch_size, host_normalize=host_normalize,
                 tokenizer=tokenizer)(step)


def load_captioned(data_cfg, split: str) -> dict[str, np.ndarray]:
  """Every field of a captioned dataset's split (shapes: images, captions, attributes;
  image-caption files: images and captions, so meant for a held-out 'test' split)."""
  if data_cfg.name in files.KINDS:
    source = _open(data_cfg, split)
    images, captions = source.fetch(np.arange(source.info.num_examples))
    return {"image": images, "caption": captions}
  if data_cfg.name != "shapes":
    raise ValueError(f"data.name={data_cfg.name!r} has no captions")
  from gdistill.data import shapes
  return shapes.load_split(_data_dir(data_cfg), split, config=data_cfg.variant or "full")


def preview_captions(data_cfg, n: int) -> list[str]:
  """The first n captions of the held-out split (shapes' 'test'; image-caption files: 'test'
  with data.holdout > 0, else 'train'): the prompts of sample grids."""
  if data_cfg.name in files.KINDS:
    split = "test" if int(data_cfg.holdout) else "train"
    root = paths.resolve(data_cfg.data_dir) if data_cfg.data_dir else ""
    index = files.open_index(data_cfg.name, root)
    rows = files.split_indices(len(index), split, int(data_cfg.holdout))
    return files.captions(index, rows[:n])
  return [str(c) for c in load_captioned(data_cfg, "test")["caption"][:n]]


def load_array(data_cfg, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """The whole split: (uint8 [N, H, W, C], int32 [N]) in dataset order.

  toy2d has no finite split: it returns a fixed reference sample,
  (float32 [10000, 2], int32 [10000]) drawn with default_rng(0).
  """
  if data_cfg.name == "toy2d":
    num_classes = _open(data_cfg).info.num_classes
    return toy2d.sample_toy2d(np.random.default_rng(0), _TOY2D_REFERENCE_SIZE, num_classes)
  source = _open(data_cfg, split)
  return source.fetch(np.arange(source.info.num_examples))


class Loader:
  """Iterates (step, local batch) from start_step on; a daemon thread prefetches."""

  def __init__(self, produce: Callable[[int], dict[str, np.ndarray]], *,
               start_step: int, prefetch: int, info: DatasetInfo):
    self.info = info
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, args=(produce, start_step),
                                    name="gdistill-data", daemon=True)
    self._thread.start()

  def _run(self, produce: Callable[[int], dict[str, np.ndarray]], step: int) -> None:
    try:
      while self._put((step, produce(step))):
        step += 1
    except BaseException as error:  # pylint: disable=broad-exception-caught
      self._put(_Failure(error))

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
    if self._error is not None:
      raise self._error
    while not self._stop.is_set():
      try:
        item = self._queue.get(timeout=1.0)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("data loader thread exited without a batch") from None
        continue
      if isinstance(item, _Failure):
        self._error = item.error
        self.close()
        raise item.error
      return item
    raise StopIteration

  def close(self) -> None:
    self._stop.set()
    while True:  # Unblock a producer waiting on a full queue.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5.0)

  def __enter__(self) -> "Loader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: BaseException


def make_loader(data_cfg, *, global_batch_size: int, seed: int, start_step: int,
                process_index: int = 0, process_count: int = 1,
                prefetch: int = 2, host_normalize: bool = True, tokenizer=None,
                examples: np.ndarray | None = None) -> Loader:
  """This process's rows of the global batch at start_step, start_step + 1, ...

  host_normalize=False: uint8 image batches for finish_batch on the device (module doc).
  tokenizer: encodes a captioned dataset's captions into 'tokens'. examples: served as 'x'
  instead of the images (_reader).
  """
  if global_batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size}, process_index={process_index}, "
        f"process_count={process_count}: the batch must split evenly over processes "
        "and 0 <= process_index < process_count.")
  if prefetch < 1 or start_step < 0:
    raise ValueError(f"prefetch={prefetch}, start_step={start_step}: "
                     "need prefetch >= 1 and start_step >= 0.")
  local = global_batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  source = _open(data_cfg)  # Fails here, not in the thread, if data is missing.
  read = _reader(data_cfg, source, global_batch_size=global_batch_size, seed=seed,
                 lo=lo, hi=hi, host_normalize=host_normalize, tokenizer=tokenizer,
                 examples=examples)
  return Loader(read, start_step=start_step, prefetch=prefetch, info=source.info)
