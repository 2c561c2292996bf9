"""shapes32: generated data, captions, the tfds builder, the word tokenizer, the attribute
classifier and its adherence / diversity measures. One slow test (full preparation)."""
import logging
import re

import numpy as np
import pytest
from scipy import ndimage

from gdistill import tokenizer as tokenizer_lib
from gdistill.data import shapes
from gdistill.metrics import attributes

_EXTRA = ("template", "center", "half_extent")


@pytest.fixture(scope="module")
def data():
  return shapes.generate(3000, seed=0)


def _cell_of(x, y):
  width = shapes.SIZE / 3
  return (np.floor(y / width) * 3 + np.floor(x / width)).astype(int)


# ----------------------------------------------------------------------------- images


def test_generate_is_deterministic_in_its_seed():
  a, b, c = shapes.generate(300, 5), shapes.generate(300, 5), shapes.generate(300, 6)
  assert sorted(a) == sorted(("image", "caption") + shapes.ATTRIBUTES)
  for key in a:
    assert a[key].dtype == b[key].dtype and len(a[key]) == 300, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert a["image"].shape == (300, 32, 32, 3) and a["image"].dtype == np.uint8
  assert not np.array_equal(a["image"], c["image"])
  assert (a["caption"] != c["caption"]).mean() > 0.5
  assert shapes.generate(0, 1)["image"].shape == (0, 32, 32, 3)


def _inside(shape: int, x, y, cx, cy, e):
  dx, dy = x - cx, y - cy
  if shapes.SHAPES[shape] == "circle":
    return dx * dx + dy * dy <= e * e
  if shapes.SHAPES[shape] == "square":
    return (np.abs(dx) <= e) & (np.abs(dy) <= e)
  return (dy <= e) & (2 * np.abs(dx) <= dy + e)


def test_interiors_hold_the_exact_colour_and_edges_blend_to_black(data):
  levels = {c: {tuple((k * rgb.astype(int) * 2 + 16) // 32) for k in range(17)}
            for c, rgb in enumerate(shapes.RGB)}
  ys, xs = np.mgrid[0:32, 0:32]
  corners = [(xs + dx, ys + dy) for dx in (0, 1) for dy in (0, 1)]
  interior_pixels = edge_pixels = 0
  for i in range(300):
    image, n = data["image"][i], data["num_objects"][i]
    allowed = set().union(*(levels[data["color"][i, s]] for s in range(n)))
    assert {tuple(p) for p in image.reshape(-1, 3)} <= allowed, i  # round(k / 16 * RGB).
    outside = np.ones((32, 32), bool)
    for s in range(n):
      (cx, cy), e = data["center"][i, s], data["half_extent"][i, s]
      rgb, shape = shapes.RGB[data["color"][i, s]], data["shape"][i, s]
      inside = np.stack([_inside(shape, x, y, cx, cy, e) for x, y in corners])
      whole = inside.all(0)  # The whole pixel is inside: exactly the colour.
      np.testing.assert_array_equal(image[whole], np.broadcast_to(rgb, image[whole].shape))
      edge = inside.any(0) & ~whole  # Anti-aliased: between black and the colour.
      assert (image[edge] <= rgb).all()
      edge &= image.any(-1) & (image < rgb).any(-1)
      interior_pixels += whole.sum()
      edge_pixels += edge.sum()
      lo, hi = shapes._pixel_box(data["center"][i, s], data["half_extent"][i, s])
      outside[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = False
    assert not image[outside].any(), i  # Black outside the objects' pixel boxes.
  assert interior_pixels > 5000 and edge_pixels > 1000


def test_attributes_agree_with_the_rendered_image(data):
  for i in range(600):
    image, n = data["image"][i].astype(float), int(data["num_objects"][i])
    labels, count = ndimage.label(image.sum(-1) > 0, structure=np.ones((3, 3)))
    assert count == n, i  # Objects never touch, not even diagonally.
    centre, extent = data["center"][i, :n], data["half_extent"][i, :n]
    assert (centre >= extent[:, None]).all() and (centre <= 32 - extent[:, None]).all()
    np.testing.assert_array_equal(_cell_of(centre[:, 0], centre[:, 1]), data["cell"][i, :n])
    for k in range(1, count + 1):
      ys, xs = np.nonzero(labels == k)
      weight = image[ys, xs].sum(-1)
      com = ((xs + 0.5) @ weight / weight.sum(), (ys + 0.5) @ weight / weight.sum())
      s = int(np.argmin(np.hypot(centre[:, 0] - com[0], centre[:, 1] - com[1])))
      assert _cell_of(*com) == data["cell"][i, s], (i, com)
      span = max(np.ptp(xs), np.ptp(ys)) + 1
      assert (span >= 11) == (data["size"][i, s] == 1) and 6 <= span <= 15, (i, span)
      assert 3 <= extent[s] <= 4 if data["size"][i, s] == 0 else 6 <= extent[s] <= 7
      full = image[ys, xs]
      assert any((p == shapes.RGB[data["color"][i, s]]).all() for p in full), i
    if n == 1:
      assert data["relation"][i] == -1 and (data["cell"][i, 1], data["color"][i, 1]) == (-1, -1)
      assert data["half_extent"][i, 1] == 0 and not data["size_stated"][i, 1]
  two = data["num_objects"] == 2
  assert shapes.boxes_apart(data["center"][two], data["half_extent"][two]).all()
  row, col = shapes.cell_row_col(data["cell"][two])
  assert (data["cell"][two, 0] != data["cell"][two, 1]).all()
  relation = data["relation"][two]
  assert set(np.unique(relation)) == {0, 1}
  assert (col[relation == 0, 0] < col[relation == 0, 1]).all()
  assert (row[relation == 1, 0] < row[relation == 1, 1]).all()


def test_clipping_keeps_centres_in_their_cells():
  rng = np.random.default_rng(0)
  cell = np.repeat(np.arange(9), 2000)
  extent = np.full(cell.shape, 7.0, np.float32)  # The largest objects clip the most.
  centre = shapes._place(rng, cell, extent)
  np.testing.assert_array_equal(_cell_of(centre[:, 0], centre[:, 1]), cell)
  assert centre.min() == 7.0 and centre.max() == 25.0  # Clipping did move some.


def test_proportions(data):
  two = data["num_objects"] == 2
  assert abs(two.mean() - 0.3) < 0.03
  single = ~two
  assert abs(data["size_stated"][single, 0].mean() - 0.5) < 0.05
  assert abs(data["cell_stated"][single, 0].mean() - 0.5) < 0.05
  assert not data["cell_stated"][two].any()
  counts = np.bincount(data["cell"][single, 0], minlength=9) / single.sum()
  assert np.abs(counts - 1 / 9).max() < 0.03
  for key, k in (("color", 6), ("shape", 3), ("size", 2)):
    counts = np.bincount(data[key][:, 0], minlength=k) / len(two)
    assert np.abs(counts - 1 / k).max() < 0.04, key


# ----------------------------------------------------------------------------- captions


def _parse(caption: str) -> dict:
  """An independent reading of a caption: objects (size or None, colour, shape), cell
  (or None) and relation."""
  words = caption.replace(",", " ,").split()
  relation = None
  for r, phrase in enumerate(shapes.RELATIONS):
    phrase = phrase.split()
    for k in range(len(words) - len(phrase) + 1):
      if words[k:k + len(phrase)] == phrase:
        relation, parts = r, [words[:k], words[k + len(phrase):]]
  if relation is None:
    parts = [words]
  objects, cell = [], None
  for part in parts:
    shape_at = next(k for k, w in enumerate(part) if w in shapes.SHAPES)
    color = part[shape_at - 1]
    size = part[shape_at - 2] if shape_at >= 2 and part[shape_at - 2] in shapes.SIZES else None
    objects.append((size, color, part[shape_at]))
    rest = " ".join(part[:shape_at - (2 if size else 1)] + ["|"] + part[shape_at + 1:])
    for c, (name, phrase) in enumerate(zip(shapes.CELLS, shapes.CELL_PHRASES)):
      if (f" {phrase} " in f" {rest} ") or rest.endswith(f"| , {name}"):
        assert cell is None, caption  # Position phrases are unambiguous.
        cell = c
  return dict(objects=objects, cell=cell, relation=relation)


def test_captions_state_exactly_the_attributes(data):
  assert len(set(data["template"].tolist())) == len(shapes.TEMPLATES) >= 5
  vocab = set(shapes.VOCAB)
  assert list(shapes.VOCAB) == sorted(vocab)
  for i, caption in enumerate(data["caption"]):
    assert caption == caption.lower() and set(caption) <= set("abcdefghijklmnopqrstuvwxyz ,")
    assert set(tokenizer_lib.split_words(caption)) <= vocab, caption
    parsed = _parse(caption)
    n = int(data["num_objects"][i])
    assert len(parsed["objects"]) == n, caption
    for s, (size, color, shape) in enumerate(parsed["objects"]):
      assert color == shapes.COLORS[data["color"][i, s]], caption
      assert shape == shapes.SHAPES[data["shape"][i, s]], caption
      assert (size is not None) == data["size_stated"][i, s], caption
      if size is not None:
        assert size == shapes.SIZES[data["size"][i, s]], caption
    assert (parsed["cell"] is not None) == data["cell_stated"][i, 0], caption
    if parsed["cell"] is not None:
      assert parsed["cell"] == data["cell"][i, 0], caption
    assert (-1 if parsed["relation"] is None else parsed["relation"]) == data["relation"][i]
  examples = set(data["caption"].tolist())
  for pattern in (r"\w+ \w+, bottom", r"a \w+ \w+", r"a small \w+ \w+ in the top left",
                  r"there is a \w+ \w+ on the right", r"a \w+ \w+ left of a \w+ \w+",
                  r"a \w+ \w+ above a small \w+ \w+"):
    assert any(re.fullmatch(pattern, c) for c in examples), pattern


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_clip_conventions(data):
  tok = tokenizer_lib.WordTokenizer(shapes.VOCAB, max_length=16)
  v = len(shapes.VOCAB)
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (v, v + 1, v + 2, v + 3)
  ids = tok.encode(list(data["caption"]))
  assert ids.shape == (3000, 16) and ids.dtype == np.int32
  assert ids.max() == tok.eos_id == tok.vocab_size - 1 and (ids[:, 0] == tok.bos_id).all()
  assert tok.decode(ids) == list(data["caption"])
  # CLIP pools at argmax(ids): the first EOS, right after the last word.
  lengths = np.array([len(tokenizer_lib.split_words(c)) for c in data["caption"]])
  np.testing.assert_array_equal(ids.argmax(-1), lengths + 1)
  assert tok.encode(["red square, bottom"])[0, 3] == shapes.VOCAB.index(",")
  assert tok.encode(["A Red  Circle"]).tolist() == tok.encode(["a red circle"]).tolist()
  empty = tok.encode([""])[0]
  assert empty.tolist() == [tok.bos_id] + [tok.eos_id] * 15 and tok.decode(empty) == ""
  unknown = tok.encode(["a red hexagon"])[0]
  assert unknown[3] == tok.unk_id and tok.decode(unknown) == "a red <|unk|>"
  short = tokenizer_lib.WordTokenizer(shapes.VOCAB, max_length=4)
  assert short.encode(["a small red circle"])[0].tolist() == [
      short.bos_id, shapes.VOCAB.index("a"), shapes.VOCAB.index("small"), short.eos_id]
  assert tokenizer_lib.WordTokenizer(shapes.VOCAB, max_length=2).encode(["red"]).tolist() == [
      [tok.bos_id, tok.eos_id]]
  assert tokenizer_lib.WordTokenizer.from_json(tok.to_json()) == tok
  assert tokenizer_lib.WordTokenizer(shapes.VOCAB).max_length == 77


@pytest.mark.parametrize("vocab, max_length, match", [
    (["red"], 1, "max_length=1"), (["red", "red"], 8, "repeated"),
    (["Red"], 8, "lowercase"), (["two words"], 8, "one token"),
    ([tokenizer_lib.EOS], 8, "special")])
def test_tokenizer_rejects_bad_arguments(vocab, max_length, match):
  with pytest.raises(ValueError, match=match):
    tokenizer_lib.WordTokenizer(vocab, max_length=max_length)
  with pytest.raises(ValueError, match="not a"):
    tokenizer_lib.WordTokenizer.from_json('{"vocab": []}')


# ----------------------------------------------------------------------------- tfds


def test_builder_prepares_quietly_and_reads_back_generate(tmp_path, capfd):
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  progress, absl_level = tqdm_utils._active, logging.getLogger("absl").level
  capfd.readouterr()
  train = shapes.load_split(str(tmp_path), "train", config="tiny")
  test = shapes.load_split(str(tmp_path), "test", config="tiny")
  out, err = capfd.readouterr()
  for noise in ("Downloading", "Generating", "Shuffling", "prepared", "%|", "examples/s",
                "WARNING", "INFO"):
    assert noise not in out + err, (noise, out, err)
  assert (tqdm_utils._active, logging.getLogger("absl").level) == (progress, absl_level)
  assert (tmp_path / "shapes32" / "tiny" / "1.0.0").is_dir()
  for split, got in (("train", train), ("test", test)):
    num, seed = (512, 256)[split == "test"], shapes.SPLITS[split][1]
    want = shapes.generate(num, seed)
    assert sorted(got) == sorted(want)
    for key in want:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{split} {key}")
  assert not train["image"].flags.writeable
  again = shapes.load_split(str(tmp_path), "train", config="tiny")
  assert again["image"] is train["image"] and again is not train
  with pytest.raises(ValueError, match="splits"):
    shapes.load_split(str(tmp_path), "validation", config="tiny")


def test_prepare_uses_the_files_of_a_process_that_won_the_race(tmp_path, monkeypatch):
  original = shapes.Shapes32.download_and_prepare

  def prepare_then_lose(self, **kwargs):
    original(self, **kwargs)  # The other process finished first ...
    raise FileExistsError("rename failed")  # ... and this one lost the rename.

  monkeypatch.setattr(shapes.Shapes32, "download_and_prepare", prepare_then_lose)
  builder = shapes.prepare(str(tmp_path), config="tiny")
  assert builder.is_prepared()
  monkeypatch.setattr(shapes.Shapes32, "download_and_prepare",
                      lambda self, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    shapes.prepare(str(tmp_path / "other"), config="tiny")


def test_full_config_sizes_and_seeds(tmp_path):
  full = shapes.Shapes32(data_dir=str(tmp_path), config="full").builder_config
  assert (full.num_train, full.num_test) == (60_000, 5_000)
  assert shapes.SPLITS["train"][1] != shapes.SPLITS["test"][1]


@pytest.mark.slow
def test_full_preparation_matches_generate(tmp_path):
  """Prepares the full 60,000 + 5,000 (~30 s on one core) and reads it back (~30 s)."""
  test = shapes.load_split(str(tmp_path), "test")
  want = shapes.generate(*shapes.SPLITS["test"])
  for key in want:
    np.testing.assert_array_equal(test[key], want[key], err_msg=key)
  assert len(shapes.load_split(str(tmp_path), "train")["caption"]) == 60_000


# ----------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def small_classifier(data, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("attributes") / "attributes.npz")
  subset = {k: v[:1000] for k, v in data.items()}
  state = attributes.get_or_train(path, subset, steps=12, batch_size=32)
  return state, path, subset


def test_classifier_trains_saves_and_reloads(small_classifier, monkeypatch):
  state, path, subset = small_classifier
  assert state.metadata["steps"] == 12 and np.isfinite(state.metadata["final_loss"])
  pred = attributes.predict(state, subset["image"][:50])
  assert pred["features"].shape == (50, attributes.FEATURE_DIM)
  for key in ("present", "color", "shape", "size", "p_empty"):
    assert pred[key].shape == (50, 9), key
  assert ((pred["color"] >= 0) == pred["present"]).all()
  np.testing.assert_array_equal(pred["num_objects"], pred["present"].sum(-1))
  floats = attributes.predict(state, subset["image"][:50].astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(floats["features"], pred["features"], atol=1e-5)

  monkeypatch.setattr(attributes, "train", lambda *a, **k: pytest.fail("retrained"))
  cached = attributes.get_or_train(path, subset)
  assert cached.metadata == state.metadata
  np.testing.assert_array_equal(attributes.predict(cached, subset["image"][:50])["features"],
                                pred["features"])
  other = dict(subset, color=(subset["color"] + 1) % 6 * (subset["color"] >= 0)
               - (subset["color"] < 0))
  with pytest.raises(ValueError, match="trained on data"):
    attributes.get_or_train(path, other)
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
    attributes.predict(state, subset["image"][:2, :16])


def test_classifier_training_is_deterministic(small_classifier):
  state, _, subset = small_classifier
  again = attributes.train(subset, steps=12, batch_size=32)
  for a, b in zip(*(jax_leaves(s.params) for s in (state, again))):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def test_cell_targets_and_mirror(data):
  cls, sizes = attributes.cell_targets(data)
  assert ((cls > 0).sum(-1) == data["num_objects"]).all()
  assert ((sizes >= 0) == (cls > 0)).all()
  i = int(np.nonzero(data["num_objects"] == 1)[0][0])
  c = data["cell"][i, 0]
  assert cls[i, c] == 1 + 3 * data["color"][i, 0] + data["shape"][i, 0]
  mirrored = attributes._MIRROR[c]
  row, col = shapes.cell_row_col(np.array([c, mirrored]))
  assert row[0] == row[1] and col[0] + col[1] == 2


# ----------------------------------------------------------------------------- evaluation


def test_ground_truth_adheres_and_a_recoloured_set_does_not(data):
  truth = attributes.from_attributes(data)
  single = attributes.single_object_adherence(truth, data)
  for key in ("all", "strict", "csp", "color", "shape", "size", "cell", "exactly_one"):
    assert single[key] == 1.0, (key, single)
  assert single["n"] == (data["num_objects"] == 1).sum() and 0 < single["n_size"] < single["n"]
  pair = attributes.two_object_adherence(truth, data)
  for key in ("all", "both", "relation", "a", "b", "color", "shape", "exactly_two"):
    assert pair[key] == 1.0, (key, pair)

  recoloured = dict(truth, color=np.where(truth["present"], (truth["color"] + 1) % 6, -1))
  single = attributes.single_object_adherence(recoloured, data)
  assert single["color"] == single["all"] == 0.0 and single["shape"] == 1.0
  pair = attributes.two_object_adherence(recoloured, data)
  assert pair["all"] == pair["both"] == 0.0 and pair["shape"] == 1.0
  # Every size wrong: csp (colour, shape, cell) still holds; all fails where size is stated.
  resized = dict(truth, size=np.where(truth["present"], 1 - truth["size"], -1))
  single = attributes.single_object_adherence(resized, data)
  assert single["csp"] == 1.0 and single["size"] == 0.0
  assert single["all"] == pytest.approx(1.0 - single["n_size"] / single["n"])

  # A and B swapped in the caption: the relation is false, the objects are still found.
  swapped = {k: (v[:, ::-1] if v.ndim == 2 else v) for k, v in data.items() if k != "image"}
  distinct = (data["num_objects"] == 2) & (
      (data["color"][:, 0] != data["color"][:, 1]) | (data["shape"][:, 0] != data["shape"][:, 1]))
  keep = {k: v[distinct] for k, v in swapped.items()}
  pair = attributes.two_object_adherence({k: v[distinct] for k, v in truth.items()}, keep)
  assert pair["both"] == 1.0 and pair["all"] == pair["relation"] == 0.0


def test_diversity_is_one_for_data_and_zero_when_collapsed(data):
  truth = attributes.from_attributes(data)
  reference = shapes.generate(3000, seed=1)
  value = attributes.diversity(truth, data, reference)
  assert 0.85 < value < 1.15, value
  assert attributes.diversity(truth, data, attributes.from_attributes(reference)) == value
  # Every object drawn into the center, small: no variety left.
  collapsed = {k: np.full_like(v, -1 if k != "present" else False) for k, v in truth.items()}
  rows = data["num_objects"] == 1
  collapsed["present"][rows, 4] = True
  collapsed["color"][rows, 4] = data["color"][rows, 0]
  collapsed["shape"][rows, 4] = data["shape"][rows, 0]
  collapsed["size"][rows, 4] = 0
  assert attributes.diversity(collapsed, data, reference) == 0.0
  nothing = dict(truth, present=np.zeros_like(truth["present"]))
  assert np.isnan(attributes.diversity(nothing, data, reference))


def test_edit_evaluation_masks_cover_what_they_repaint_and_spare_what_they_keep(data):
  """gdistill/edit_eval.py's inpainting cases: a fill mask holds every large object the data
  can place in its cell (the cell's own box is smaller than a large object) and spares the kept
  object; a remove mask covers the removed object and spares the kept one."""
  from gdistill import edit_eval
  cases = edit_eval.shapes_cases(data, 200)
  fill, remove = cases["fill"], cases["remove"]
  one = np.flatnonzero((data["num_objects"] == 1) & (data["cell"][:, 0] != 4))[:200]
  two = np.flatnonzero(data["num_objects"] == 2)[:200]
  assert len(fill["masks"]) == 200 and len(remove["masks"]) == 200
  width, big = shapes.SIZE / 3, shapes.HALF_EXTENT[1][1]
  # The corners and the centre of the cell's middle half (where the data puts centres).
  corners = [(ux, uy) for ux in (0.25, 0.75) for uy in (0.25, 0.75)] + [(0.5, 0.5)]
  for i, (cell, mask) in enumerate(zip(fill["cell"], fill["masks"])):
    kept = data["image"][one[i]].max(-1) > 0
    assert not (mask.astype(bool) & kept).any()
    row, col = divmod(int(cell), 3)
    centres = np.clip([[(col + ux) * width, (row + uy) * width] for ux, uy in corners],
                      big, shapes.SIZE - big).astype(np.float32)
    squares = shapes.render(np.zeros((5, 1), np.int32), np.ones((5, 1), np.int32),
                            centres[:, None], np.full((5, 1), big, np.float32)).max(-1) > 0
    assert not (squares & ~mask.astype(bool)).any()
  for i, mask in zip(two, remove["masks"]):
    a, b = (shapes.render(data["color"][i, None, k, None], data["shape"][i, None, k, None],
                          data["center"][i, None, k, None], data["half_extent"][i, None, k, None]
                          )[0].max(-1) > 0 for k in (0, 1))
    assert (mask.astype(bool) | ~b).all() and not (mask.astype(bool) & a).any()
