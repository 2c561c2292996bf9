"""What the embedded datasets (digits8x8, shapes32) share: a tfds builder base that prepares
quietly, lossless PNG encoding without TensorFlow, a guard against registering a name twice,
and a preparation that tolerates another process preparing the same directory."""
import contextlib
import io
import logging
from typing import Callable, TypeVar

import numpy as np
import tensorflow_datasets as tfds

B = TypeVar("B", bound=tfds.core.DatasetBuilder)


def registered(name: str) -> bool:
  """Whether a builder called `name` is registered already: a second execution of its
  module (importlib.reload, or the file imported under another module name) must not
  register it again (tfds raises "Dataset with name ... already registered"). The first
  class stays registered; gdistill instantiates the classes directly anyway."""
  return name in tfds.core.registered.list_imported_builders()


def png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 1] (mode L) or [H, W, 3] (RGB) as a lossless PNG through PIL: tfds would
  encode numpy arrays through a TensorFlow graph, and importing TensorFlow costs ~10 s."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of data that exists only where it is generated: no copy of its metadata on
  tfds' GCS bucket to look for. tfds' lookup (`initialize_from_bucket`, run whenever a builder
  is made before its data is prepared) creates an empty `tmp*tfds` directory in the system
  temp dir and never removes it: one per preparation, hundreds over a test run."""

  def initialize_from_bucket(self) -> None:
    pass


class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder of data generated on this machine (nothing is downloaded)."""

  def dataset_info_from_configs(self, **kwargs) -> tfds.core.DatasetInfo:
    """tfds' own, as a LocalDatasetInfo."""
    metadata = self.get_metadata()
    if metadata.description:
      kwargs["description"] = metadata.description
    if metadata.citation:
      kwargs["citation"] = metadata.citation
    return LocalDatasetInfo(builder=self, **kwargs)

  # tfds prints "Downloading and preparing dataset ..." and "... downloaded and prepared"
  # with termcolor whatever its verbosity: embedded data is prepared quietly.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


@contextlib.contextmanager
def quiet_tfds():
  """No tfds progress bars and only ERROR from absl while inside; both restored on exit.

  tfds logs through absl: INFO lines per split written, WARNINGs that are noise here
  ("OpenCV is not installed ...", a variant folder without dataset_info.json while
  another config is being prepared). Process-wide for its duration: tfds' progress switch
  and the 'absl' logger are global.
  """
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  was_active = getattr(tqdm_utils, "_active", True)  # tfds has no public getter.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  tfds.display_progress_bar(False)
  if absl_logger.getEffectiveLevel() < logging.ERROR:
    absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_active)
    absl_logger.setLevel(level)


def prepare(build: Callable[[], B]) -> B:
  """build()'s builder, prepared quietly if it was not.

  Another process may prepare the same directory at the same time: whoever loses the
  final rename sees the winner's files and uses them.
  """
  with quiet_tfds():  # is_prepared() too warns while the folder is still empty.
    builder = build()
    if builder.is_prepared():
      return builder
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:
      builder = build()
      if not builder.is_prepared():
        raise
  return builder
