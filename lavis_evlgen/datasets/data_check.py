"""Data checked at dataset build, before any training step: annotation files, texts, images, videos.

The shapes builders run ``check_datasets`` on every split they build:

- every annotation file is parsed here first, so a broken one fails naming the file, line and
  column (``read_annotation_file``), and an entry that is not an object names its index;
- every record's text (``caption``: a non-empty string, or for eval a non-empty list of them;
  ``question`` for VQA) is checked; captions longer than the text processor's ``max_words`` (which
  it truncates) are counted, not refused;
- every image or video a record names must exist and decode: images are fully decoded with PIL's
  ``LOAD_TRUNCATED_IMAGES`` off (``strict_decoding``), JPEGs at 1/8 scale (``draft``: the whole
  file is still read, at a fraction of the cost); videos open with decord and their last frame is
  decoded (a truncated clip fails there); the video datasets add their short-clip rule
  (``media_problem``).

``build_info.data_check`` (``DataCheckConfig``) says what a bad record does: ``on_bad: error`` (the
default) raises ``DataError`` listing the first ``show`` problems with file and entry; ``skip``
drops the bad records, logs the count and keeps a report (``DataCheckReport``) that train.py writes
to ``data_check.json`` in the run's output directory.

Cost: files are decoded by a thread pool (decoders release the GIL), each file once however many
records name it, and the result is kept in a manifest (sqlite, under the cache) keyed by path, size
and mtime, so a file is decoded again only when it changes; under torch.distributed the main
process checks first (``_download_data``) and the others find the manifest filled.
"""
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile

from lavis_evlgen.common.paths import cache_root

ON_BAD = ("error", "skip")
# Record keys shown when a record is named in a message (its long texts are left out).
RECORD_ID_KEYS = ("image", "video", "image_id", "question_id")


class DataError(RuntimeError):
    """Bad annotation files or records, named with their file and entry."""


@dataclass
class DataCheckConfig:
    """``build_info.data_check``: the one place its defaults live."""

    # error: refuse the data, listing the first bad records; skip: drop them, count and report them.
    on_bad: str = "error"
    # How many bad records an error or the log lists.
    show: int = 10
    # Decoding threads; 0: one per CPU core (at most 16).
    workers: int = 0
    # Remember decoded files (path, size, mtime) in <EVLGEN_CACHE>/data_check.sqlite.
    manifest: bool = True

    def __post_init__(self):
        if self.on_bad not in ON_BAD:
            raise ValueError(f"build_info.data_check.on_bad must be one of {ON_BAD}, got {self.on_bad!r}")
        for name in ("show", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"build_info.data_check.{name} must be an int >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, cfg) -> "DataCheckConfig":
        cfg = dict(cfg or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise KeyError(f"build_info.data_check: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**cfg)

    def num_workers(self) -> int:
        return self.workers or min(16, os.cpu_count() or 1)


@dataclass(frozen=True)
class Problem:
    """One bad record: why, and where (annotation file, entry index, the record's ids)."""

    reason: str
    file: str
    entry: int
    record: str
    index: int  # into the dataset's annotation when checked

    def __str__(self) -> str:
        return f"{self.reason} (annotation entry {self.entry} of {self.file}: {self.record})"


@dataclass
class DataCheckReport:
    """What the check of one split found."""

    name: str
    records: int = 0
    files: int = 0
    problems: list[Problem] = field(default_factory=list)
    skipped: int = 0
    over_long: int = 0
    max_words: int | None = None

    def summary(self, show: int) -> dict:
        return {"records": self.records, "media_files": self.files, "bad": len(self.problems),
                "skipped": self.skipped, "over_long_captions": self.over_long, "max_words": self.max_words,
                "first_bad": [str(p) for p in self.problems[:show]]}


# ---------------------------------------------------------------------------------- annotation files
def read_annotation_file(path) -> list[dict]:
    """The records of a JSON annotation file (a list of objects); DataError naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise DataError(f"annotation file {path} does not exist") from error
    except UnicodeDecodeError as error:
        raise DataError(f"annotation file {path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise DataError(f"annotation file {path} is not valid JSON: {error.msg} at line {error.lineno}, "
                        f"column {error.colno} (a truncated or partly written file?)") from error
    return data


def check_records_file(path) -> list[dict]:
    """``read_annotation_file`` of a file of records: a list whose every entry is an object."""
    data = read_annotation_file(path)
    if not isinstance(data, list):
        raise DataError(f"annotation file {path} must hold a list of records, not a {type(data).__name__}")
    for entry, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"annotation entry {entry} of {path} is not an object: {json.dumps(record)[:120]}")
    return data


def text_problem(record: dict, key: str, many: bool) -> str | None:
    """Why ``record[key]`` is not a usable text (a non-empty string; ``many``: a non-empty list of them)."""
    if key not in record:
        return f"no {key!r}"
    value = record[key]
    texts = value if many and isinstance(value, list) else [value]
    if many and not texts:
        return f"an empty list of {key}s"
    for text in texts:
        if not isinstance(text, str):
            return f"{key} {json.dumps(text)[:80]} is not a string"
        if not text.strip():
            return f"an empty {key}"
    return None


def count_over_long(records: list[dict], key: str, max_words: int | None) -> int:
    """Texts with more words than ``max_words`` (the caption processor truncates them)."""
    if max_words is None:
        return 0
    texts = (t for r in records for t in (r.get(key) if isinstance(r.get(key), list) else [r.get(key)]))
    return sum(1 for t in texts if isinstance(t, str) and len(t.split()) > max_words)


# ---------------------------------------------------------------------------------- media files
@contextlib.contextmanager
def strict_decoding():
    """PIL refuses truncated images while inside (LAVIS's caption datasets turn that off globally)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def image_status(path: str) -> tuple[str | None, int | None]:
    """(why the image cannot be used or None, None): it must exist and decode completely."""
    if not os.path.isfile(path):
        return f"image {path} is missing", None
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, still reading every byte
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return f"image {path} cannot be decoded: {type(error).__name__}: {str(error).strip()[:200]}", None
    return None, None


def video_status(path: str) -> tuple[str | None, int | None]:
    """(why the video cannot be used or None, its frame count): it must exist, open, and decode
    its last frame."""
    from decord import VideoReader

    if not os.path.isfile(path):
        return f"video {path} is missing", None
    try:
        reader = VideoReader(uri=path)
        frames = len(reader)
        if frames < 1:
            return f"video {path} has no frames", None
        reader[frames - 1]
    except Exception as error:  # decord raises a bare RuntimeError ("Error reading ...")
        return f"video {path} cannot be read: {str(error).strip()[:200]}", None
    return None, frames


class Manifest:
    """Results of decoded files, keyed by (path, size, mtime_ns), in one sqlite file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=600, check_same_thread=False)
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS checked (kind TEXT, path TEXT, size INT, mtime_ns INT, "
                             "error TEXT, frames INT, PRIMARY KEY (kind, path))")

    def get(self, kind: str, path: str, stat) -> tuple[str | None, int | None] | None:
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns, error, frames FROM checked WHERE kind=? AND path=?",
                                   (kind, path)).fetchone()
        if row is None or (row[0], row[1]) != (stat.st_size, stat.st_mtime_ns):
            return None
        return row[2], row[3]

    def put_many(self, rows: list[tuple]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO checked VALUES (?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


def check_media(paths, kind: str, config: DataCheckConfig) -> dict[str, tuple[str | None, int | None]]:
    """path -> (problem or None, frames or None) for every distinct path; ``kind`` "image" | "video"."""
    status_fn = {"image": image_status, "video": video_status}[kind]
    paths = list(dict.fromkeys(paths))
    manifest = Manifest(cache_root() / "data_check.sqlite") if config.manifest else None
    results, todo, stats = {}, [], {}
    for path in paths:
        try:
            stats[path] = os.stat(path)
        except OSError:
            results[path] = status_fn(path)  # missing: nothing to decode or remember
            continue
        known = manifest.get(kind, path, stats[path]) if manifest else None
        if known is None:
            todo.append(path)
        else:
            results[path] = known
    if todo:
        with strict_decoding(), ThreadPoolExecutor(config.num_workers()) as pool:
            fresh = dict(zip(todo, pool.map(status_fn, todo, chunksize=64)))
        results.update(fresh)
        if manifest:
            manifest.put_many([(kind, p, stats[p].st_size, stats[p].st_mtime_ns, *fresh[p]) for p in todo])
    if manifest:
        manifest.close()
    return results


# ---------------------------------------------------------------------------------- datasets
class CheckedMedia:
    """What a checked dataset declares: which record key names its media file ("image" | "video"),
    which holds its text, and whether that is a list (eval captions). Images need nothing more;
    the video datasets override the two hooks (frame counts, short clips)."""

    MEDIA_KEY = "image"
    TEXT_KEY = "caption"
    MANY_TEXTS = False
    # VQA eval datasets read their records from the first annotation file only.
    RECORDS_IN_FIRST_FILE = False

    def remember_media(self, statuses: dict[str, tuple[str | None, int | None]]) -> None:
        """Called with every media file's check result before ``media_problem``."""

    def media_problem(self, record: dict, status: tuple[str | None, int | None]) -> str | None:
        """Why the record's media file (checked: ``status``) cannot be used, or None."""
        return status[0]


def locate(sizes: list[tuple[str, int]], index: int) -> tuple[str, int]:
    """(file, entry) of record ``index`` of records concatenated from files of the given sizes."""
    for path, size in sizes:
        if index < size:
            return path, index
        index -= size
    raise IndexError(f"record {index} is beyond the annotation files {[p for p, _ in sizes]}")


def record_ids(record: dict) -> str:
    return json.dumps({k: record[k] for k in RECORD_ID_KEYS if k in record})


def check_dataset(dataset, name: str, sizes: list[tuple[str, int]], config: DataCheckConfig) -> DataCheckReport:
    """Every record of a built dataset checked: text, then its media (``dataset.media_problem``).

    ``dataset`` is a ``CheckedMedia``. ``sizes``: (file, records) of the files its annotation came
    from, in order.
    """
    records = dataset.annotation
    report = DataCheckReport(name=name, records=len(records))
    media_key = dataset.MEDIA_KEY
    paths = {k: os.path.join(dataset.vis_root, r[media_key]) for k, r in enumerate(records)
             if isinstance(r.get(media_key), str)}
    statuses = check_media(paths.values(), media_key, config)
    report.files = len(statuses)
    dataset.remember_media(statuses)
    for index, record in enumerate(records):
        if index in paths:
            reason = text_problem(record, dataset.TEXT_KEY, dataset.MANY_TEXTS) or \
                dataset.media_problem(record, statuses[paths[index]])
        else:
            reason = f"no {media_key!r} path"
        if reason:
            file, entry = locate(sizes, index)
            report.problems.append(Problem(reason, file, entry, record_ids(record), index))
    report.max_words = getattr(dataset.text_processor, "max_words", None)
    report.over_long = count_over_long(records, dataset.TEXT_KEY, report.max_words)
    return report


def drop_records(dataset, bad: set[int]) -> None:
    """Removes records ``bad`` (indices into ``dataset.annotation``) and renumbers what depends on them."""
    dataset.annotation = [r for k, r in enumerate(dataset.annotation) if k not in bad]
    dataset._add_instance_ids()
    if hasattr(dataset, "img_ids"):  # caption train datasets: dense image indices
        unique_ids = dict.fromkeys(r["image_id"] for r in dataset.annotation)
        dataset.img_ids = {image_id: n for n, image_id in enumerate(unique_ids)}


def apply_reports(datasets: dict, reports: dict[str, DataCheckReport], config: DataCheckConfig) -> None:
    """Raise DataError listing the first bad records (``on_bad: error``), or drop them and log counts."""
    problems = [p for report in reports.values() for p in report.problems]
    for report in reports.values():
        if report.over_long:
            logging.info("%s: %d captions have more than %d words (the text processor truncates them)",
                         report.name, report.over_long, report.max_words)
    if not problems:
        return
    listing = "\n  ".join(str(p) for p in problems[: config.show])
    more = f"\n  ... and {len(problems) - config.show} more" if len(problems) > config.show else ""
    if config.on_bad == "error":
        raise DataError(f"{len(problems)} bad records (set build_info.data_check.on_bad: skip to drop and count "
                        f"them):\n  {listing}{more}")
    for split, report in reports.items():
        if report.problems:
            drop_records(datasets[split], {p.index for p in report.problems})
            report.skipped = len(report.problems)
    logging.warning("data check: skipped %d bad records (build_info.data_check.on_bad: skip):\n  %s%s",
                    len(problems), listing, more)


def write_data_check(datasets: dict, output_dir: Path, show: int = 10) -> Path | None:
    """Writes ``data_check.json`` (per dataset and split: records, bad, skipped, over-long captions,
    the first bad records) into the run's output directory; None when no dataset was checked."""
    summary = {name: {split: dataset.data_check.summary(show) for split, dataset in splits.items()
                      if isinstance(getattr(dataset, "data_check", None), DataCheckReport)}
               for name, splits in datasets.items()}
    summary = {name: splits for name, splits in summary.items() if splits}
    if not summary:
        return None
    path = Path(output_dir) / "data_check.json"
    path.write_text(json.dumps(summary, indent=1))
    return path
