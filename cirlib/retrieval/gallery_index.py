"""A gallery index: the stage-I embeddings of every image under a folder, kept up to date as the folder changes.

What it is: an image feature store (`feature_store`, outputs "embeds" only, float32) over the folder's files, plus
the file list. The embeddings are the first stage's gallery side: (G, D), or (G, V, D) for a multi-vector first stage
(its weights are fixed here, so a first stage whose gallery head trains in stage I is stored alike). The store
lives inside the index folder (`<index>/features/stage1-<key hash>/`), not under the shared outputs root, because
its image names are the index's own *file identities* `"<name>|<size>|<mtime_ns>"` (name = the path relative to the
folder, posix): a changed file (other size or mtime) is another identity, so the store embeds it afresh, and two
folders holding the same relative names never share rows. The store's machinery
does the rest: shards written whole or not at all, an interrupted build resumed from its whole shards, a progress
bar, the key (stage-I image-side weights hash + preprocessing) checked at open.

Layout (this module owns it):

- `index.json`: format, the store key (image-side weights hash, preprocessing), the stage-I model's full weights
  hash (`stage1_sha256`: a query must use the very stage I the index was built with, text side included), what the
  stage I was (`stage1`: a run or a checkpoint, for the query command), the store folder, the entries (name, path,
  size, mtime_ns) in name order, the unreadable files (name -> size, mtime_ns, error) and the provenance record.
  Written last, atomically: until then the previous index.json (or none) stands, so an interrupted update is
  redone (its whole shards kept) by the next run;
- `report.json`: the last build's report (counts, the names added/removed/changed, the unreadable files and why);
- `features/stage1-<hash>/`: the store.

Incremental: a name whose (size, mtime_ns) is unchanged keeps its row; a new or changed one is embedded; a removed
one leaves the entries (its row stays in the store, unread: `IndexReport.stale_rows` counts them). An unreadable file
(not decodable as an image) is reported, left out, and retried only when its size or mtime changes. A stage I with
other image-side weights or preprocessing gets a new store: `build_index` rebuilds (deleting the old store, the
reason in the report) or, with `replace=False`, refuses with the reason.

Search: `search.search_gallery`, the pipeline's one first-stage search (exact, or "faiss" for galleries whose (N, G)
product does not fit in memory; both take the max over a multi-vector gallery's vectors); a query's own reference is
excluded when asked. The format is unchanged by multi-vector galleries (the store records its shape): an index built
before reads the same.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cirlib import data as cdata
from cirlib import paths
from cirlib.retrieval import feature_store as fs
from cirlib.retrieval import search
from cirlib.run_folder import folder_lock

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
LOCK_FILE = "index.lock"  # held while the index is built: a second build of the same folder is refused
DEFAULT_SHARD_SIZE = 1024  # images per shard (stage-I embeddings only: 1 KB per image at E=256)


class GalleryIndexError(Exception):
    """An index cannot be used or built as asked; the message names the folder and what to do."""


class IndexMismatchError(GalleryIndexError):
    """The index was built with another stage I (or preprocessing) than the one asked for."""


# ---------------------------------------------------------------------------------------------------- files
def list_images(image_dir: str | os.PathLike) -> dict[str, Path]:
    """Every image file under a folder (recursive; suffixes `IMAGE_SUFFIXES`, any case): posix path relative to the
    folder -> file, sorted by name.

    Raises:
        GalleryIndexError: the folder does not exist.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise GalleryIndexError(f"image folder {root} does not exist (or is not a folder)")
    found = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class Entry:
    """One indexed file: its name, where it is, and what identifies its content (size, mtime)."""

    name: str
    path: str
    size: int
    mtime_ns: int

    @property
    def identity(self) -> str:
        """The store's name for this content of this file."""
        return f"{self.name}|{self.size}|{self.mtime_ns}"


def _stat(files: Mapping[str, Path]) -> tuple[dict[str, Entry], dict[str, str]]:
    entries, failed = {}, {}
    for name, path in sorted(files.items()):
        try:
            st = Path(path).stat()
        except OSError as e:
            failed[name] = f"cannot stat {path}: {e}"
            continue
        entries[name] = Entry(str(name), str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    return entries, failed


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class IndexReport:
    """What a build did. Counts compare with the previous index (all files are "added" on a first build)."""

    out_dir: Path
    status: str  # "built" | "updated" | "unchanged" | "rebuilt"
    reason: str  # why it was rebuilt ("" otherwise)
    images: int  # files in the index now
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # name -> why (not in the index)
    embedded: int = 0  # images encoded by this build (added + changed + an interrupted build's rest)
    stale_rows: int = 0  # rows of removed or changed files still in the store (never read)
    stage1_sha256: str = ""
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {"images": self.images, "added": len(self.added), "removed": len(self.removed),
                "changed": len(self.changed), "unchanged": self.unchanged, "unreadable": len(self.unreadable),
                "embedded": self.embedded}

    def summary(self) -> str:
        """One line of counts, then one line per unreadable file."""
        c = self.counts()
        head = (f"index {self.out_dir}: {self.status}{f' ({self.reason})' if self.reason else ''}; "
                f"{c['images']} images: {c['added']} added, {c['removed']} removed, {c['changed']} changed, "
                f"{c['unchanged']} unchanged, {c['unreadable']} unreadable; {c['embedded']} embedded in "
                f"{self.seconds:.1f} s")
        lines = [head] + [f"  unreadable: {name}: {why}" for name, why in self.unreadable.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["counts"] = self.counts()
        return out


# ---------------------------------------------------------------------------------------------------- the index
def _read_index(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / INDEX_FILE
    if not path.is_file():
        return None
    data = paths.read_json(path, "gallery index")
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not {"key", "entries", "store"} <= set(data):
        raise GalleryIndexError(f"{path} is not a gallery index of format {FORMAT_VERSION} (needs key, entries, store): "
                                "delete the folder and build it again")
    return data


class GalleryIndex:
    """A built index, opened for searching: names (sorted), their files and normalised stage-I embeddings
    (`embeddings`: (G, D), or (G, V, D) for a multi-vector first stage)."""

    def __init__(self, out_dir: Path, data: Mapping[str, Any], store: fs.FeatureStore):
        self.out_dir = Path(out_dir)
        self.data = dict(data)
        self.entries = [Entry(**e) for e in data["entries"]]
        self.names: list[str] = [e.name for e in self.entries]
        self.positions: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        self._by_name = {e.name: e for e in self.entries}
        self.key: dict[str, Any] = dict(data["key"])
        self.stage1_sha256: str = data["stage1_sha256"]
        self.stage1: dict[str, Any] = dict(data.get("stage1") or {})
        self.preprocess: dict[str, Any] = dict(self.key["preprocess"])
        self.store = store
        self.embeddings: torch.Tensor = (store.embeddings([e.identity for e in self.entries]) if self.entries
                                         else torch.empty(0, *(store.embed_shape or (0,))))
        report = self.out_dir / REPORT_FILE
        self.report: dict[str, Any] = paths.read_json(report, "gallery index report") if report.is_file() else {}
        self._resolved: dict[str, str] | None = None

    @classmethod
    def open(cls, out_dir: str | os.PathLike) -> "GalleryIndex":
        """Open a built index.

        Raises:
            GalleryIndexError: no index there (naming the command that builds one), or its store is damaged.
        """
        out_dir = Path(out_dir)
        data = _read_index(out_dir)
        if data is None:
            raise GalleryIndexError(f"no gallery index at {out_dir} (no {INDEX_FILE}): build it with "
                                    f"`python -m cirlib.search index IMAGE_DIR --stage1 RUN --out {out_dir}`")
        try:
            store = fs.FeatureStore.open(out_dir / data["store"], data["key"])
        except fs.FeatureStoreError as e:
            raise GalleryIndexError(f"gallery index {out_dir}: {e}; run the index command again to repair it") from e
        return cls(out_dir, data, store)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.positions

    def path(self, name: str) -> Path:
        """The file of an indexed name (KeyError naming the index when unknown)."""
        if name not in self._by_name:
            raise KeyError(f"{name!r} is not in the gallery index {self.out_dir} ({len(self.names)} images)")
        return Path(self._by_name[name].path)

    def identity(self, name: str) -> str:
        """The store's name of an indexed file's content ("<name>|<size>|<mtime_ns>")."""
        self.path(name)  # KeyError naming the index when unknown
        return self._by_name[name].identity

    def name_of(self, path: str | os.PathLike) -> str | None:
        """The indexed name of a file (same resolved path), or None."""
        if self._resolved is None:
            self._resolved = {e.path: e.name for e in self.entries}
        return self._resolved.get(str(Path(path).resolve()))

    def search(self, query_embeds: torch.Tensor, k: int, exclude: Sequence[int | None] | None = None, *,
               method: str = "exact", chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best rows per query: (scores (N, k') float32 first-stage scores, rows (N, k') int64), best first.

        k' = min(k, gallery size, less one when any query excludes a row). The one first-stage search,
        `search.search_gallery` (exact: a stable sort, ties in name order, as `search.rank_gallery`; "faiss": an exact
        inner-product index, `pip install -e '.[faiss]'`).

        Args:
            exclude: per query, a row never returned (its reference), or None.
        """
        n = query_embeds.shape[0]
        exclude = list(exclude) if exclude is not None else [None] * n
        if len(exclude) != n:
            raise ValueError(f"exclude has {len(exclude)} entries for {n} queries")
        rows = torch.tensor([-1 if row is None else int(row) for row in exclude], dtype=torch.long).view(n, 1)
        return search.search_gallery(query_embeds, self.embeddings, k, exclude=rows, method=method, chunk=chunk)


# ---------------------------------------------------------------------------------------------------- building
def _unreadable_among(names: Sequence[str], by_identity: Mapping[str, Entry]) -> dict[str, str]:
    """identity -> error of the files among `names` that cannot be decoded as images."""
    bad = {}
    for ident in names:
        try:
            cdata.load_image(by_identity[ident].path)
        except cdata.DatasetError as e:
            bad[ident] = str(e)
    return bad


def build_index(files: Mapping[str, Path], stage1_model, *, preprocess: Mapping[str, Any], out_dir: str | os.PathLike,
                batch_size: int = 32, device: torch.device | str = "cpu", provenance: Mapping[str, Any] | None = None,
                stage1: Mapping[str, Any] | None = None, replace: bool = True,
                shard_size: int = DEFAULT_SHARD_SIZE) -> IndexReport:
    """Build or bring up to date the index of `files` with this stage I's image side.

    Args:
        files: name -> image file (`list_images(folder)`, or any mapping).
        stage1_model: a first stage (its `encode_image` embeds the images, keyed by its `image_weights`; all its
            weights hashed besides, for the queries).
        preprocess: the store's preprocess dict (`feature_store.preprocessing(target_ratio, image_size)`).
        out_dir: the index folder (created).
        provenance: what produced the index (a `cirlib.provenance.record`), stored in index.json.
        stage1: what the stage I is ({"run": folder} or {"checkpoint": file, "preset", "tokenizer"}), so a query can
            load it again; stored in index.json.
        replace: when the index was built with another stage I or preprocessing: True rebuilds it (the reason in
            the report), False refuses (IndexMismatchError naming what differs).
    Returns:
        the report (also written to `<out_dir>/report.json`).
    """
    out_dir = Path(out_dir)
    paths.check_writable(out_dir, f"gallery index folder {out_dir}")
    with folder_lock(out_dir / LOCK_FILE, f"gallery index {out_dir}",
                     "wait for that index command to finish, or stop it"):
        return _build_index(files, stage1_model, preprocess=preprocess, out_dir=out_dir, batch_size=batch_size,
                            device=device, provenance=provenance, stage1=stage1, replace=replace,
                            shard_size=shard_size)


def _build_index(files, stage1_model, *, preprocess, out_dir: Path, batch_size, device, provenance, stage1, replace,
                 shard_size) -> IndexReport:
    t0 = time.time()
    encoder = fs.stage1_image_encoder(stage1_model, ("embeds",))
    key = fs.store_key(encoder, preprocess, "float32")
    full_sha = fs.weights_sha256({"stage1": stage1_model})
    old = _read_index(out_dir)
    status, reason = ("built", "") if old is None else ("updated", "")
    if old is not None and (old["key"] != key or old.get("stage1_sha256") != full_sha):
        diffs = fs.key_differences(old["key"], key) or [
            f"stage-I weights (index {old.get('stage1_sha256', '')[:12]} vs now {full_sha[:12]}; same image side)"]
        reason = "built with another stage I or preprocessing: " + "; ".join(diffs)
        if not replace:
            raise IndexMismatchError(f"gallery index {out_dir} was {reason}; rebuild it (replace=True) or use the "
                                     "stage I it was built with")
        if old["key"] != key:  # another store: the old one is dropped; same image side: the store is kept
            shutil.rmtree(out_dir / old["store"], ignore_errors=True)
        old_entries = {}
        old_unreadable = {}
        status = "rebuilt"
    else:
        old_entries = {} if old is None else {e["name"]: Entry(**e) for e in old["entries"]}
        old_unreadable = {} if old is None else dict(old.get("unreadable", {}))
    entries, unreadable = _stat(files)
    # a file that was unreadable with this very size and mtime is not tried again
    for name, e in list(entries.items()):
        was = old_unreadable.get(name)
        if was is not None and (was["size"], was["mtime_ns"]) == (e.size, e.mtime_ns):
            unreadable[name] = was["error"]
            del entries[name]
    by_identity = {e.identity: e for e in entries.values()}
    folder = fs.store_folder(key, out_dir)
    failed_entries: dict[str, Entry] = {}
    held_before: set[str] | None = None
    for _attempt in range(3):  # a retry leaves out every unreadable file of the failed build, else raises
        plan = fs.plan_build(key, list(by_identity), outputs_root=out_dir, shard_size=shard_size)
        todo = set(plan.todo)
        todo_names = [n for s in plan.shards if s["id"] in todo for n in s["names"]]
        if held_before is None:  # what the store held before this build (whole shards of an interrupted one too)
            held_before = {n for s in plan.shards if s["id"] not in todo for n in s["names"]}
        try:
            if plan.status != "reused":
                fs.build_shards(plan, encoder, {i: Path(e.path) for i, e in by_identity.items()},
                                batch_size=batch_size, device=device)
                fs.finish_build(plan)
            break
        except cdata.DatasetError:
            bad = _unreadable_among(todo_names, by_identity)
            if not bad:
                raise
            for ident, why in bad.items():
                e = by_identity.pop(ident)
                failed_entries[e.name] = e
                unreadable[e.name] = why
    else:
        raise GalleryIndexError(f"gallery index {out_dir}: the build kept failing on unreadable images "
                                f"({list(unreadable)[:5]}); see the messages above")
    final = {e.name: e for e in by_identity.values()}
    store = fs.FeatureStore.open(folder, key)
    added = [n for n in final if n not in old_entries]
    removed = [n for n in old_entries if n not in final]
    changed = [n for n, e in final.items()
               if n in old_entries and (old_entries[n].size, old_entries[n].mtime_ns) != (e.size, e.mtime_ns)]
    unchanged = len(final) - len(added) - len(changed)
    embedded = sum(1 for i in by_identity if i not in held_before)
    if status == "updated" and not (added or removed or changed or embedded):
        status = "unchanged"
    stat_of = {**{n: e for n, e in entries.items()}, **failed_entries}
    unreadable_record = {n: {"size": stat_of[n].size, "mtime_ns": stat_of[n].mtime_ns, "error": why}
                         for n, why in unreadable.items() if n in stat_of}
    report = IndexReport(out_dir=out_dir, status=status, reason=reason, images=len(final), added=added,
                         removed=removed, changed=changed, unchanged=unchanged, unreadable=dict(unreadable),
                         embedded=embedded, stale_rows=len(store) - len(final), stage1_sha256=full_sha,
                         seconds=time.time() - t0)
    paths.write_json(out_dir / REPORT_FILE, report.to_dict())
    paths.write_json(out_dir / INDEX_FILE, {
        "format": FORMAT_VERSION, "key": key, "stage1_sha256": full_sha, "stage1": dict(stage1 or {}),
        "store": folder.relative_to(out_dir).as_posix(),
        "entries": [dataclasses.asdict(e) for e in sorted(final.values(), key=lambda e: e.name)],
        "unreadable": unreadable_record, "provenance": dict(provenance or {})})
    return report
