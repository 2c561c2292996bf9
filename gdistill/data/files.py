"""Image-caption datasets in files: a folder of images with .txt captions, or webdataset shards.

Two layouts of the same thing, one example = one image + its caption:

  image_folder   data_dir/**/KEY.{jpg,jpeg,png,webp,bmp} with data_dir/**/KEY.txt beside it
                 (the caption, UTF-8; any sub-folder depth). Examples are in the order of their
                 paths relative to data_dir, sorted.
  webdataset     data_dir/*.tar shards (sorted by name); in each, the members KEY.jpg (or
                 another image extension) and KEY.txt, where KEY is the member's path up to the
                 first dot of its file name (webdataset's convention). Examples are in shard
                 order, then in the order their images appear in the shard. The shards are
                 indexed once (tar headers only) and read by offset: random access, no unpacking.

An image is decoded with Pillow, converted to RGB, scaled (bicubic, antialiased) so that its
shorter side is `resolution`, and centre-cropped to resolution x resolution (Stable Diffusion's
training crop); an image already of that size is used as it is, pixel for pixel. A caption is
its file's text with surrounding white space removed and inner line breaks made spaces.

Both serve random access by example index, so the input pipeline's deterministic, resumable
order (gdistill/data/pipeline.py: the batch at step s is a function of the seed and s) applies
unchanged. `holdout` examples (a fixed random choice, seed 0) form the split 'test' and are left
out of 'train'; with holdout 0, 'train' is every example and there is no 'test'.

  index = open_index("image_folder", "/data/pets")
  images, captions = read(index, np.array([0, 5]), resolution=512)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import tarfile
import threading

import numpy as np

KINDS = ("image_folder", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
_HOLDOUT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Index:
  """Where every example's image and caption bytes are.

  image_folder: `files[i]` is (image path, caption path). webdataset: `shards` the tar paths and
  `files[i]` is (shard number, image offset, image size, caption offset, caption size).
  names[i] is the example's path (its key) for messages."""
  kind: str
  root: str
  names: tuple[str, ...]
  files: tuple[tuple, ...]
  shards: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.names)


def _layout_help(kind: str, root: str) -> str:
  if kind == "image_folder":
    return (f"data.name='image_folder' reads images (jpg, png, webp, bmp) with a .txt caption "
            f"of the same name beside each, anywhere under data.data_dir={root!r}")
  return (f"data.name='webdataset' reads the *.tar shards in data.data_dir={root!r}, each "
          "holding KEY.jpg (or png, webp) + KEY.txt pairs")


def _index_folder(root: str) -> Index:
  images, captions = {}, set()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in filenames:
      rel = os.path.relpath(os.path.join(dirpath, f), root)
      stem, ext = os.path.splitext(rel)
      if ext.lower() in IMAGE_EXTENSIONS:
        if stem in images:
          raise ValueError(f"two images share the caption file {stem}.txt in {root!r}: "
                           f"{images[stem]} and {rel}; rename one")
        images[stem] = rel
      elif ext == CAPTION_EXTENSION:
        captions.add(stem)
  if not images:
    raise FileNotFoundError(f"no images found: {_layout_help('image_folder', root)}")
  missing = sorted(images[s] for s in images if s not in captions)
  if missing:
    raise ValueError(f"{len(missing)} of {len(images)} images in {root!r} have no caption "
                     f"file (KEY.txt beside KEY.jpg): {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}. Add the captions or move the "
                     "images out of data.data_dir")
  stems = sorted(images)
  return Index("image_folder", root, tuple(images[s] for s in stems),
               tuple((os.path.join(root, images[s]), os.path.join(root, s + ".txt"))
                     for s in stems))


def _split_member(name: str) -> tuple[str, str]:
  """webdataset key and extension: 'a/b/x.seg.jpg' -> ('a/b/x', 'seg.jpg')."""
  head, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(head, stem), ext.lower()


def _index_shards(root: str) -> Index:
  shards = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))
  if not shards:
    raise FileNotFoundError(f"no .tar shards found: {_layout_help('webdataset', root)}")
  names, files = [], []
  for n, shard in enumerate(shards):
    found: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    try:
      with tarfile.open(shard, mode="r:") as tar:
        for m in tar:
          if not m.isfile():
            continue
          key, ext = _split_member(m.name)
          if key not in found:
            found[key] = {}
            order.append(key)
          found[key][ext] = (m.offset_data, m.size)
    except tarfile.TarError as e:
      raise ValueError(f"{shard} is not a readable (uncompressed) tar shard: {e}") from None
    for key in order:
      parts = found[key]
      image = next((parts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in parts), None)
      if image is None:
        continue  # a key without an image (e.g. only .json metadata) is not an example
      if "txt" not in parts:
        raise ValueError(f"{shard}: {key} has an image but no {key}.txt caption; every "
                         "example of a webdataset shard needs KEY.txt")
      names.append(f"{os.path.basename(shard)}:{key}")
      files.append((n, *image, *parts["txt"]))
  if not files:
    raise FileNotFoundError(f"the shards in {root!r} hold no image + .txt pairs: "
                            f"{_layout_help('webdataset', root)}")
  return Index("webdataset", root, tuple(names), tuple(files), tuple(shards))


@functools.lru_cache(maxsize=8)
def open_index(kind: str, root: str) -> Index:
  """The index of the dataset of `kind` at root (built once per process)."""
  if kind not in KINDS:
    raise ValueError(f"unknown image-caption layout {kind!r}; valid: {KINDS}")
  if not root:
    raise ValueError(f"data.name={kind!r} needs data.data_dir: {_layout_help(kind, '<dir>')}")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data.data_dir={root!r} is not a directory: "
                            f"{_layout_help(kind, root)}")
  return _index_folder(root) if kind == "image_folder" else _index_shards(root)


def split_indices(n: int, split: str, holdout: int) -> np.ndarray:
  """Example indices of `split`: 'test' the `holdout` examples of a fixed draw, 'train' the
  others (all when holdout is 0), in index order."""
  if not 0 <= holdout < n:
    raise ValueError(f"data.holdout={holdout}: need 0 <= holdout < {n} (the examples found)")
  test = np.sort(np.random.default_rng(_HOLDOUT_SEED).permutation(n)[:holdout])
  if split == "test":
    if not holdout:
      raise ValueError("an image-caption dataset has a 'test' split only with data.holdout > 0 "
                       "(that many examples held out of 'train')")
    return test
  if split == "train":
    return np.setdiff1d(np.arange(n), test)
  raise ValueError(f"data.split={split!r}: an image-caption dataset has 'train' and, with "
                   "data.holdout > 0, 'test'")


class _Reader:
  """Byte ranges of an index; one open file per shard and thread."""

  def __init__(self, index: Index):
    self.index = index
    self._local = threading.local()

  def _shard(self, n: int):
    handles = getattr(self._local, "handles", None)
    if handles is None:
      handles = self._local.handles = {}
    if n not in handles:
      handles[n] = open(self.index.shards[n], "rb")  # pylint: disable=consider-using-with
    return handles[n]

  def bytes(self, i: int) -> tuple[bytes, bytes]:
    entry = self.index.files[i]
    if self.index.kind == "image_folder":
      with open(entry[0], "rb") as f:
        image = f.read()
      with open(entry[1], "rb") as f:
        caption = f.read()
      return image, caption
    f = self._shard(entry[0])
    f.seek(entry[1])
    image = f.read(entry[2])
    f.seek(entry[3])
    return image, f.read(entry[4])


def decode_image(data: bytes, resolution: int, name: str = "") -> np.ndarray:
  """Image bytes -> uint8 [resolution, resolution, 3]: RGB, shorter side scaled to resolution
  (bicubic), centre crop; untouched when already resolution x resolution."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ValueError(f"cannot decode the image {name or '<bytes>'}: {e}") from None
  w, h = img.size
  if (w, h) != (resolution, resolution):
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
  return np.asarray(img, np.uint8)


def decode_caption(data: bytes) -> str:
  return " ".join(data.decode("utf-8", errors="replace").split())


@functools.lru_cache(maxsize=8)
def _executor(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                               thread_name_prefix="gdistill-decode")


@functools.lru_cache(maxsize=8)
def _reader(index: Index) -> _Reader:
  return _Reader(index)


def read(index: Index, idx: np.ndarray, resolution: int,
         threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Examples idx -> (uint8 [n, resolution, resolution, 3], str [n] captions); decoded on
  `threads` threads (Pillow releases the GIL while it decodes and scales)."""
  reader = _reader(index)

  def one(i: int):
    image, caption = reader.bytes(int(i))
    return decode_image(image, resolution, index.names[int(i)]), decode_caption(caption)
  if threads > 1 and len(idx) > 1:
    out = list(_executor(threads).map(one, idx))
  else:
    out = [one(i) for i in idx]
  images = np.stack([o[0] for o in out]) if out else np.zeros((0, resolution, resolution, 3),
                                                              np.uint8)
  return images, np.asarray([o[1] for o in out], dtype=object)


def captions(index: Index, idx: np.ndarray) -> list[str]:
  """The captions of examples idx (no image is decoded)."""
  reader = _reader(index)
  out = []
  for i in idx:
    entry = index.files[int(i)]
    if index.kind == "image_folder":
      with open(entry[1], "rb") as f:
        out.append(decode_caption(f.read()))
    else:
      out.append(decode_caption(reader.bytes(int(i))[1]))
  return out
