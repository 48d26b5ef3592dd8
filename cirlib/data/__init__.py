"""The data room: dataset readers (real CIRR / FashionIQ layouts), the original's preprocessing, torch datasets, the
BLIP tokenizer and the synthetic CIR world. Imports nothing from cirlib but the path helpers, the registry and the
pure evaluation functions (cirlib.eval: metrics and submission validators the dataset classes report with).

Each dataset is a class (`cirlib.data.cirr.CIRR`, `fashioniq.FashionIQ`, `circo.CIRCO`) in the `DATASETS` registry;
`get_dataset(name or split)` returns its object (see `cirlib.data.dataset`).

The readers' public names are re-exported here (`from cirlib import data as cdata; cdata.load_split(...)`).
"""
from cirlib.data.datasets import GalleryDataset, QueryDataset, TripletDataset, collate
from cirlib.data.readers import (CIRR_SPLITS, FIQ_CATEGORIES, FIQ_SPLITS, FIQ_TRAIN_ORDER,
                                 MISSING_IMAGES_POLICIES, DatasetError, DroppedImages, Query, SplitData,
                                 check_missing_images_policy, drop_missing, fiq_caption_join, load_image, load_split,
                                 missing_images_error, query_images, query_text, raise_if_missing, split_label)
from cirlib.data.dataset import DATASETS, Dataset, dataset_names, get_dataset
from cirlib.data import circo, cirr, fashioniq  # noqa: E402,F401  (the built-in datasets register themselves)
from cirlib.data.transforms import CLIP_MEAN, CLIP_STD, SquarePad, TargetPad, squarepad_transform, targetpad_transform

__all__ = [
    "CIRR_SPLITS", "CLIP_MEAN", "CLIP_STD", "DATASETS", "Dataset", "DatasetError", "DroppedImages", "FIQ_CATEGORIES",
    "FIQ_SPLITS", "FIQ_TRAIN_ORDER", "GalleryDataset", "MISSING_IMAGES_POLICIES", "check_missing_images_policy",
    "dataset_names", "drop_missing", "get_dataset", "missing_images_error", "query_images", "raise_if_missing",
    "split_label", "Query", "QueryDataset", "SplitData", "SquarePad", "TargetPad", "TripletDataset", "collate",
    "fiq_caption_join", "load_image", "load_split", "query_text", "squarepad_transform", "targetpad_transform",
]
