"""TFDS builder `digits8x8`: scikit-learn's bundled 8x8 handwritten digits.

The 1,797 images ship inside scikit-learn, so preparing the dataset reads them
from the local install; nothing is ever downloaded. Pixel values 0..16 are
stored as uint8 0..255 (`round(v * 255 / 16)`) in a single `train` split that
keeps scikit-learn's order.

  builder = Digits8x8(data_dir=DIR, file_format='array_record')
  builder.download_and_prepare()
"""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from gdistill.data import embedded

NAME = "digits8x8"
NUM_EXAMPLES = 1797


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """0..16 -> 0..255, rounding half to even (only 8 -> 127.5 -> 128)."""
  return np.rint(np.asarray(pixels, np.float64) * 255.0 / 16.0).astype(np.uint8)


class Digits8x8(embedded.EmbeddedBuilder, skip_registration=embedded.registered(NAME)):
  """scikit-learn `load_digits`: 8x8 grayscale digits, 10 classes."""

  name = NAME
  # tfds 4.9.10 resolves `code_path` through `importlib_resources`, which it
  # does not declare as a dependency; state the path so it is never needed.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, train = all 1,797."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="scikit-learn's 8x8 handwritten digits (UCI optdigits "
        "test set), pixels rescaled from 0..16 to 0..255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # Keep scikit-learn's order.
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn: no download.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = to_uint8(digits.images)[..., None]
    labels = digits.target.astype(np.int64)
    assert images.shape == (NUM_EXAMPLES, 8, 8, 1), images.shape
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": embedded.png(image), "label": label}
