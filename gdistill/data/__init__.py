"""Datasets and the input pipeline: digits8x8 (TFDS, from scikit-learn), shapes32 (procedural
captioned images), toy2d, TFDS catalog, image-caption files (a folder, or webdataset shards)."""
from gdistill.data.pipeline import DatasetInfo
from gdistill.data.pipeline import dataset_info
from gdistill.data.pipeline import finish_batch
from gdistill.data.pipeline import global_batch
from gdistill.data.pipeline import load_array
from gdistill.data.pipeline import load_captioned
from gdistill.data.pipeline import Loader
from gdistill.data.pipeline import make_loader
from gdistill.data.pipeline import needs_finish
from gdistill.data.pipeline import normalize
from gdistill.data.pipeline import normalize_on_device
from gdistill.data.pipeline import preview_captions
from gdistill.data.pipeline import streams_images
from gdistill.data.toy2d import sample_toy2d

__all__ = [
    "DatasetInfo", "Loader", "dataset_info", "finish_batch", "global_batch", "load_array",
    "load_captioned",
    "make_loader", "needs_finish", "normalize", "normalize_on_device", "preview_captions",
    "streams_images",
    "sample_toy2d",
]
