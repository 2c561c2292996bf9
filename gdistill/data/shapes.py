"""TFDS builder `shapes32`: procedural captioned 32x32 images, a pure function of a seed.

Each image is black with one object (70%) or two (30%) flat-coloured objects:
  colour COLORS (values RGB), shape SHAPES (a disc; an axis-aligned square; a triangle
  pointing up whose base equals its height), size SIZES (half-extent e ~ U[3, 4] px for
  small, U[6, 7] px for large: a disc's radius, a square's half side, a triangle's half base
  = half height), cell CELLS (the 3x3 grid, index = 3 * row + column from the top left).
Geometry is in pixels of the 32x32 canvas, x to the right and y down; an object's centre
(the centre of its bounding box) is uniform in the middle half of its cell, then clipped to
[e, 32 - e] so that the object stays inside the canvas. Clipping can move a centre (a
large object drawn near an outer edge), but never out of its cell: the middle half keeps
32/12 px from the cell's edges and e <= 7 < 32/3, so the clipped centre stays in the cell
it was drawn in, and so does the centre of mass (a triangle's lies e/3 below its centre).
Objects are rendered at 4x (128x128, a sub-pixel is inside iff its centre is) and
area-downsampled (the mean of 4x4 blocks): a pixel is round(coverage * RGB), so interiors
hold the exact RGB triple and edges lie between it and black.

Two objects are in different cells and their pixel bounding boxes (the pixels their
shapes touch) are at least one empty pixel row or column apart; a pair that is not is
redrawn (cells and centres; colours, shapes and sizes are kept), so two large objects are
never in adjacent cells (and 27% of pairs are neighbours against 56% of uniform pairs). The caption relates them, "A left of B" only if A's column is
left of B's, "A above B" only if A's row is above B's (one at random when both hold;
when neither holds the objects are swapped): object 0 is always A.

Captions (TEMPLATES) are lowercase words and commas, the comma written after a word
("red square, bottom") and a token of its own in VOCAB. Templates 0-3 state the cell,
4-6 do not, 7-9 describe two objects (size optional, cell never stated). A single
object's size is stated with probability 1/2 and its cell with probability 1/2; what a
caption does not state still varies in the image.

The tfds builder stores generate(60_000, 0) as 'train' and generate(5_000, 1) as 'test'
(config 'full'; config 'tiny', 512 / 256 examples, is for tests) in array_record files,
prepared quietly (no progress bars, no tfds log lines) on first use:

  data = generate(1000, seed=0)           # dict of numpy arrays, see ATTRIBUTES
  train = load_split(data_dir, "train")   # prepared on first use, then in memory
"""
import dataclasses
import functools

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from gdistill.data import embedded

NAME = "shapes32"
SIZE = 32
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
RGB = np.array([(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 210, 40),
                (150, 60, 200), (230, 230, 230)], np.uint8)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
HALF_EXTENT = ((3.0, 4.0), (6.0, 7.0))  # [size] -> (low, high) of U[low, high], pixels.
CELLS = ("top left", "top", "top right", "left", "center", "right",
         "bottom left", "bottom", "bottom right")
# The position phrase of each cell after a noun ("a red circle in the top left").
CELL_PHRASES = ("in the top left", "at the top", "in the top right", "on the left",
                "in the center", "on the right", "in the bottom left", "at the bottom",
                "in the bottom right")
RELATIONS = ("left of", "above")  # relation index 0, 1; -1 = none.
TEMPLATES = (
    "a {a} {at}",              # 0: a small red circle in the top left
    "{a}, {cell}",             # 1: red square, bottom
    "there is a {a} {at}",     # 2: there is a blue circle on the right
    "{at} there is a {a}",     # 3: in the center there is a large white square
    "a {a}",                   # 4: a large yellow triangle
    "{a}",                     # 5: purple square
    "there is a {a}",          # 6: there is a small green circle
    "a {a} {rel} a {b}",       # 7: a red circle left of a blue square
    "{a} {rel} {b}",           # 8: green triangle above small white circle
    "there is a {a} {rel} a {b}",  # 9: there is a red square above a blue circle
)
CELL_TEMPLATES = (0, 1, 2, 3)
PLAIN_TEMPLATES = (4, 5, 6)
PAIR_TEMPLATES = (7, 8, 9)
TWO_OBJECT_FRACTION = 0.3
STATE_PROBABILITY = 0.5  # Of stating a single object's size, and (separately) its cell.
PAIR_SIZE_PROBABILITY = 0.3  # Of stating each object's size in a two-object caption.
SPLITS = {"train": (60_000, 0), "test": (5_000, 1)}  # split -> (examples, seed).
_SCALE = 4  # Render at 4x, then average 4x4 blocks.
_WINDOW = 16  # Pixels rendered around one object: 2 * 7 + 1 < 16.
_CHUNK = 8192  # Objects rendered at once (8192 * 64 * 64 bytes of sub-pixels).


def _vocab() -> tuple[str, ...]:
  words = {","} | set(COLORS) | set(SHAPES) | set(SIZES)
  for phrase in CELLS + CELL_PHRASES + RELATIONS + TEMPLATES:
    for word in phrase.replace(",", " ").split():
      if not word.startswith("{"):
        words.add(word)
  return tuple(sorted(words))


VOCAB = _vocab()  # Every token a caption can hold, sorted.

# Per example, as generate() returns them and the tfds builder stores them.
#   image uint8 [32, 32, 3]; caption str; num_objects, relation, template int32 [];
#   color, shape, size, cell int32 [2] (-1 where absent); size_stated, cell_stated bool [2]
#   (False where absent); center float32 [2, 2] (x, y per object, 0 where absent);
#   half_extent float32 [2] (0 where absent).
ATTRIBUTES = ("num_objects", "color", "shape", "size", "cell", "relation", "size_stated",
              "cell_stated", "template", "center", "half_extent")


def cell_row_col(cell):
  """Cell index -> (row, column), 0..2 each from the top left."""
  return np.divmod(cell, 3)


def _place(rng: np.random.Generator, cell: np.ndarray, extent: np.ndarray) -> np.ndarray:
  """Centres float32 [..., 2] (x, y): uniform in the middle half of the cell, clipped to
  [e, 32 - e]."""
  row, col = cell_row_col(cell)
  width = SIZE / 3
  u = rng.random(cell.shape + (2,))
  centre = (np.stack([col, row], -1) + 0.25 + 0.5 * u) * width
  return np.clip(centre, extent[..., None], SIZE - extent[..., None]).astype(np.float32)


def _pixel_box(centre: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """First and last pixel (inclusive, [..., 2] as x, y) that an object's square box touches."""
  lo = np.floor(centre - extent[..., None]).astype(np.int32)
  hi = np.ceil(centre + extent[..., None]).astype(np.int32) - 1
  return lo, hi


def boxes_apart(centre: np.ndarray, extent: np.ndarray) -> np.ndarray:
  """Whether objects 0 and 1 ([N, 2, 2], [N, 2]) have an empty pixel row or column between
  their pixel boxes: bool [N]."""
  lo, hi = _pixel_box(centre, extent)
  gap = (hi[:, 0] + 1 < lo[:, 1]) | (hi[:, 1] + 1 < lo[:, 0])  # [N, 2]: along x, along y.
  return gap.any(-1)


def _coverage(shape: np.ndarray, centre: np.ndarray, extent: np.ndarray,
              origin: np.ndarray) -> np.ndarray:
  """Sub-pixels inside each object, uint8 [n, 16, 16] (0..16) over the 16x16 pixel
  window whose top-left pixel is origin [n, 2] (x, y)."""
  n = shape.shape[0]
  offsets = (np.arange(_WINDOW * _SCALE, dtype=np.float32) + 0.5) / _SCALE
  x = origin[:, 0, None] + offsets - centre[:, 0, None]  # [n, 64], relative to the centre.
  y = origin[:, 1, None] + offsets - centre[:, 1, None]
  e = extent[:, None, None]
  inside = np.zeros((n, _WINDOW * _SCALE, _WINDOW * _SCALE), bool)
  for k in range(len(SHAPES)):
    rows = shape == k
    if not rows.any():
      continue
    xk, yk, ek = x[rows][:, None, :], y[rows][:, :, None], e[rows]
    if SHAPES[k] == "circle":
      inside[rows] = xk * xk + yk * yk <= ek * ek
    elif SHAPES[k] == "square":
      inside[rows] = (np.abs(xk) <= ek) & (np.abs(yk) <= ek)
    else:  # Triangle: apex (0, -e), base y = e from x = -e to e.
      inside[rows] = (yk <= ek) & (2 * np.abs(xk) <= yk + ek)
  blocks = inside.reshape(n, _WINDOW, _SCALE, _WINDOW, _SCALE)
  return blocks.sum((2, 4), dtype=np.uint8)


def render(color: np.ndarray, shape: np.ndarray, centre: np.ndarray,
           extent: np.ndarray) -> np.ndarray:
  """Images uint8 [N, 32, 32, 3] of objects [N, K] (color -1 = absent) on black.

  Objects of one image must not share a pixel (generate() keeps them apart)."""
  n, k = color.shape
  canvas = np.zeros((n, SIZE, SIZE, 3), np.uint16)
  image, slot = np.nonzero(color >= 0)
  window = np.arange(_WINDOW)
  for lo in range(0, len(image), _CHUNK):
    i, j = image[lo:lo + _CHUNK], slot[lo:lo + _CHUNK]
    c, e = centre[i, j], extent[i, j]
    origin = np.clip(np.floor(c - e[:, None]).astype(np.int32), 0, SIZE - _WINDOW)
    count = _coverage(shape[i, j], c, e, origin).astype(np.uint16)  # [m, 16, 16]
    # round(count / 16 * rgb), halves up, in integers.
    value = (count[..., None] * RGB[color[i, j]][:, None, None, :].astype(np.uint16) * 2
             + 16) // 32
    ys = origin[:, 1, None, None] + window[None, :, None]
    xs = origin[:, 0, None, None] + window[None, None, :]
    for s in range(k):  # One object per image per pass: no repeated index in `+=`.
      rows = j == s
      canvas[i[rows, None, None], ys[rows], xs[rows]] += value[rows]
  assert canvas.max(initial=0) <= 255
  return canvas.astype(np.uint8)


def _noun(color: int, shape: int, size: int, size_stated: bool) -> str:
  words = ([SIZES[size]] if size_stated else []) + [COLORS[color], SHAPES[shape]]
  return " ".join(words)


def _caption(a: dict, b: dict | None, template: int, relation: int) -> str:
  cell = a["cell"]
  return TEMPLATES[template].format(
      a=_noun(a["color"], a["shape"], a["size"], a["size_stated"]),
      b="" if b is None else _noun(b["color"], b["shape"], b["size"], b["size_stated"]),
      at=CELL_PHRASES[cell], cell=CELLS[cell],
      rel=RELATIONS[relation] if relation >= 0 else "")


def generate(num: int, seed: int) -> dict[str, np.ndarray]:
  """`num` examples drawn with default_rng(seed): the module doc's distribution.

  Returns {'image': uint8 [num, 32, 32, 3], 'caption': str [num], and ATTRIBUTES}; the
  same (num, seed) always gives identical arrays.
  """
  if num < 0:
    raise ValueError(f"num={num}: need num >= 0.")
  rng = np.random.default_rng(seed)
  num_objects = np.where(rng.random(num) < TWO_OBJECT_FRACTION, 2, 1).astype(np.int32)
  two = num_objects == 2
  color = rng.integers(0, len(COLORS), (num, 2), dtype=np.int32)
  shape = rng.integers(0, len(SHAPES), (num, 2), dtype=np.int32)
  size = rng.integers(0, len(SIZES), (num, 2), dtype=np.int32)
  low, high = np.asarray(HALF_EXTENT, np.float32).T
  extent = (low[size] + (high - low)[size] * rng.random((num, 2))).astype(np.float32)
  cell = np.empty((num, 2), np.int32)
  centre = np.empty((num, 2, 2), np.float32)
  redraw = np.ones(num, bool)
  while redraw.any():  # Redraw cells and centres until the two objects are apart.
    m = int(redraw.sum())
    first = rng.integers(0, 9, m, dtype=np.int32)
    cell[redraw] = np.stack([first, (first + rng.integers(1, 9, m, dtype=np.int32)) % 9], -1)
    centre[redraw] = _place(rng, cell[redraw], extent[redraw])
    redraw &= two & ~boxes_apart(centre, extent)

  # Relation from the cells; swap A and B where neither "A left of B" nor "A above B".
  row, col = cell_row_col(cell)
  swap = two & (col[:, 0] >= col[:, 1]) & (row[:, 0] >= row[:, 1])
  for a in (color, shape, size, extent, cell, centre):
    a[swap] = a[swap][:, ::-1]
  row, col = cell_row_col(cell)
  left, above = col[:, 0] < col[:, 1], row[:, 0] < row[:, 1]
  pick_above = rng.random(num) < 0.5
  relation = np.where(left & above, np.where(pick_above, 1, 0), np.where(above, 1, 0))
  relation = np.where(two, relation, -1).astype(np.int32)

  size_stated = rng.random((num, 2)) < np.where(two, PAIR_SIZE_PROBABILITY,
                                                STATE_PROBABILITY)[:, None]
  cell_stated = np.stack([~two & (rng.random(num) < STATE_PROBABILITY),
                          np.zeros(num, bool)], -1)
  template = np.where(
      two, rng.choice(PAIR_TEMPLATES, num),
      np.where(cell_stated[:, 0], rng.choice(CELL_TEMPLATES, num),
               rng.choice(PLAIN_TEMPLATES, num))).astype(np.int32)

  absent = np.stack([np.zeros(num, bool), ~two], -1)
  for a in (color, shape, size, cell):
    a[absent] = -1
  extent[absent] = 0.0
  centre[absent] = 0.0
  size_stated &= ~absent

  image = render(color, shape, centre, extent)
  objects = [[dict(color=color[i, s], shape=shape[i, s], size=size[i, s], cell=cell[i, s],
                   size_stated=size_stated[i, s]) for s in range(2)] for i in range(num)]
  caption = np.array([_caption(o[0], o[1] if n == 2 else None, t, r)
                      for o, n, t, r in zip(objects, num_objects, template, relation)],
                     dtype=str)
  return dict(image=image, caption=caption, num_objects=num_objects, color=color,
              shape=shape, size=size, cell=cell, relation=relation, size_stated=size_stated,
              cell_stated=cell_stated, template=template, center=centre,
              half_extent=extent)


def _features() -> tfds.features.FeaturesDict:
  pair_int = lambda: tfds.features.Tensor(shape=(2,), dtype=np.int32)
  pair_bool = lambda: tfds.features.Tensor(shape=(2,), dtype=np.bool_)
  scalar = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(SIZE, SIZE, 3), dtype=np.uint8),
      "caption": tfds.features.Text(),
      "num_objects": scalar(), "relation": scalar(), "template": scalar(),
      "color": pair_int(), "shape": pair_int(), "size": pair_int(), "cell": pair_int(),
      "size_stated": pair_bool(), "cell_stated": pair_bool(),
      "center": tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
      "half_extent": tfds.features.Tensor(shape=(2,), dtype=np.float32),
  })


@dataclasses.dataclass
class Shapes32Config(tfds.core.BuilderConfig):
  """Split sizes; the seeds are SPLITS' whatever the size."""
  num_train: int = SPLITS["train"][0]
  num_test: int = SPLITS["test"][0]


class Shapes32(embedded.EmbeddedBuilder, skip_registration=embedded.registered(NAME)):
  """Procedural captioned shapes: 'full' (60,000 / 5,000) and 'tiny' (512 / 256, tests)."""

  name = NAME
  code_path = epath.Path(__file__)  # See digits.py: no importlib_resources needed.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "generate(n, seed): train seed 0, test seed 1."}
  BUILDER_CONFIGS = [
      Shapes32Config(name="full", description="60,000 train, 5,000 test."),
      Shapes32Config(name="tiny", description="512 train, 256 test (tests).",
                     num_train=512, num_test=256),
  ]
  DEFAULT_CONFIG_NAME = "full"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="32x32 black images with one or two flat-coloured shapes (6 colours, "
        "3 shapes, 2 sizes, 9 cells) and a caption naming some of their attributes.",
        features=_features(),
        disable_shuffling=True,  # Keep generate()'s order.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated: no download.
    sizes = {"train": self.builder_config.num_train, "test": self.builder_config.num_test}
    return {split: self._generate_examples(sizes[split], SPLITS[split][1])
            for split in SPLITS}

  def _generate_examples(self, num: int, seed: int):
    data = generate(num, seed)
    for i in range(num):
      example = {k: data[k][i] for k in ATTRIBUTES}
      yield i, dict(example, image=embedded.png(data["image"][i]),
                    caption=str(data["caption"][i]))


def prepare(data_dir: str, config: str = "full") -> Shapes32:
  """The builder of shapes32/<config> in data_dir, prepared quietly if it was not.

  Another process may prepare the same directory at the same time: whoever loses the
  final rename sees the winner's files and uses them.
  """
  return embedded.prepare(
      lambda: Shapes32(data_dir=data_dir, config=config, file_format="array_record"))


def _decode(examples: list[dict], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
  out = {k: np.stack([np.asarray(e[k], dtypes[k]) for e in examples]) for k in dtypes}
  out["caption"] = np.array([e["caption"].decode() if isinstance(e["caption"], bytes)
                             else str(e["caption"]) for e in examples], dtype=str)
  return out


@functools.lru_cache(maxsize=4)
def _load(data_dir: str, split: str, config: str) -> dict[str, np.ndarray]:
  builder = prepare(data_dir, config)
  features = builder.info.features
  dtypes = {k: np.dtype(features[k].np_dtype) for k in ("image",) + ATTRIBUTES}
  chunk = 4096
  with embedded.quiet_tfds():
    source = builder.as_data_source(split=split)
    parts = [_decode(source.__getitems__(list(range(lo, min(lo + chunk, len(source))))),
                     dtypes) for lo in range(0, len(source), chunk)]
  data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  for value in data.values():
    value.flags.writeable = False
  return data


def load_split(data_dir: str, split: str, *, config: str = "full") -> dict[str, np.ndarray]:
  """The whole split in memory, as generate() returns it (arrays read-only, held for the
  process); prepares shapes32/<config> in data_dir first if needed."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: shapes32 has splits {sorted(SPLITS)}.")
  return dict(_load(data_dir, split, config))
