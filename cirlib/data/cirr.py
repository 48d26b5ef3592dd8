"""CIRR (github.com/Cuberick-Orion/CIRR): the dataset class. Its layout (both image layouts: the original's, and the
official download's img_raw/) is read by `cirlib.data.readers.load_cirr_layout`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from cirlib.data import readers
from cirlib.data.dataset import DATASETS, Dataset
from cirlib.eval import metrics as M
from cirlib.eval import submission


@DATASETS.register
class CIRR(Dataset):
    """CIRR: one gallery per split, the reference excluded from its own ranking, img_sets for Recall_subset."""

    name = "cirr"
    title = "CIRR"
    splits = readers.CIRR_SPLITS
    test_split = "test1"
    reported_ks = (1, 5, 10, 50)
    subset_ks = M.SUBSET_KS
    excludes_reference = True
    has_image_sets = True
    has_test_server = True
    original_file_prefix = "cirr"
    layout = readers._CIRR_LAYOUT
    root_marker, root_folder = "cirr", "cirr_dataset"
    public_sha256 = {
        "cirr/image_splits/split.rc2.train.json": "7b3f2211ff67e527190754ab778321a3c83f0baa6150d1e6c19646ec25c3bcb9",
        "cirr/image_splits/split.rc2.val.json": "de36f7a7219c8bb06347a67748cfc68405be7dad62853a1e31846c98e491235b",
        "cirr/image_splits/split.rc2.test1.json": "bf2bb9ed0659c4aae35de72350652b9ab75d36a060211f826bec15c58ec12566",
        "cirr/captions/cap.rc2.val.json": "a85c3a1aa464f1af7229918e8018d08b8b20ce5dab479ffdf39d61113140f919",
        "cirr/captions/cap.rc2.test1.json": "26a2b2e7a5c96c903491aefc7d5f237f03d3cca97712e1b6bb3b231db5ff8001",
        "cirr/captions/cap.rc2.train.json": None,
    }
    public_counts = {("train", None): (28225, 16939), ("val", None): (4181, 2297), ("test1", None): (4148, 2315)}

    def load_split(self, root: Path, split: str, category: str | None = None, *,
                   with_queries: bool = True) -> readers.SplitData:
        return readers.load_cirr_layout(root, split, with_queries, dataset=self.name)

    def split_metrics(self, recall: dict[str, float], group_labels: Any = None) -> dict[str, float]:
        """Recall@K and, where the split's img_sets are known, Recall_subset@K."""
        out = dict(recall)
        if group_labels is not None:
            out.update(M.subset_recall_at_k(group_labels, self.subset_ks))
        return out

    def summary_metrics(self, per_split: Sequence[tuple[str | None, dict[str, float]]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, metrics in per_split:
            out.update(metrics)
        if out:
            out["selection"] = M.cirr_selection_score(out)
        return out

    # ------------------------------------------------------------------------------------------------ paper tables
    table_note = "Avg = (R@5 + Rs@1) / 2; Rs@K: Recall_subset@K"

    def table_columns(self) -> tuple[tuple[str, str], ...]:
        """R@1/5/10/50, Rsubset@1/2/3 and Avg, as CIRR papers print them."""
        return (*super().table_columns(), *((f"Rsubset@{k}", f"Rs@{k}") for k in self.subset_ks), ("Avg", "Avg"))

    def table_average(self, metrics: Mapping[str, float]) -> float | None:
        """(R@5 + Rsubset@1) / 2 (`cirr_selection_score`), or None without either."""
        return M.cirr_selection_score(metrics) if {"R@5", "Rsubset@1"} <= set(metrics) else None

    # ------------------------------------------------------------------------------------------------- submission
    def submission_files(self, split_data: readers.SplitData, recall_lists: Sequence[Sequence[str]],
                         subset_lists: Sequence[Sequence[str]], name: str) -> tuple[submission.SubmissionFile, ...]:
        """The server's two files for the test split's queries (`recall_submission_<name>.json` and
        `recall_subset_submission_<name>.json`): 50 ranked gallery names and 3 ranked img_set members per pair id."""
        pair_ids = [q.pair_id for q in split_data.queries]
        return submission.cirr_submission_files(pair_ids, recall_lists, subset_lists, name)

    def check_submission(self, path: Path, split_data: readers.SplitData) -> None:
        """Raise SubmissionError listing every problem the server would find in a written file."""
        submission.check_cirr_submission(path, split_data.queries, split_data.gallery)

    def test_annotation_files(self, root: Path) -> tuple[Path, Path]:
        """The test split's (caption file, image-split file) a submission is checked against."""
        return root.joinpath(*submission.CAPTIONS_IN_ROOT), root.joinpath(*submission.SPLIT_IN_ROOT)

    def check_submission_file(self, path: Path, root: Path, recall_length: int | None = None) -> list[str]:
        """The problems of a test-server file (empty: it is valid), checked against the test annotation files;
        recall lists hold min(50, test gallery - 1) names unless `recall_length` says otherwise."""
        captions, split = self.test_annotation_files(root)
        gallery = submission.read_gallery_names(split)
        length = recall_length or min(submission.RECALL_LENGTH, len(gallery) - 1)
        return submission.validate_cirr_submission(path, captions, gallery, recall_length=length)
