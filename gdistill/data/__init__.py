"""Datasets and the input pipeline: digits8x8 (TFDS, from scikit-learn), toy2d, TFDS catalog."""
from gdistill.data.pipeline import DatasetInfo
from gdistill.data.pipeline import dataset_info
from gdistill.data.pipeline import global_batch
from gdistill.data.pipeline import load_array
from gdistill.data.pipeline import Loader
from gdistill.data.pipeline import make_loader
from gdistill.data.toy2d import sample_toy2d

__all__ = [
    "DatasetInfo", "Loader", "dataset_info", "global_batch", "load_array",
    "make_loader", "sample_toy2d",
]
