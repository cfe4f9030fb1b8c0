"""Preparing raw photos ("bring your own data"): the resumable journal every preparer shares, and
``prepare_products``. Faces and landmark photos are prepared by :mod:`visrec.faces.prepare`, which detects and
aligns through the face layer.

Every preparer is ``fn(src, out, ..., workers=1, progress=None) -> PrepareReport``:

``prepare_products``   product photos -> the Perfect-500K catalogue (``out/catalogue/<id>.jpg``), padded to a
                       square with white and resized.

Resume. ``out/prepare_journal.jsonl`` holds a settings line, then one JSON line per finished input (its
outcome and output file). An output is written to a temporary name and renamed into place before its journal
line is appended (flushed and fsynced), so a crash loses at most the inputs in flight, and an input done
twice rewrites the same file. A re-run skips the journaled inputs (``retry_problems=True`` retries those that
failed) and refuses different settings (start a new ``out`` for those); a run that wrote nothing binds no
settings. ``out/prepare_report.json`` is rewritten at the end of every run from the whole journal. A
non-empty ``out`` without a journal is refused (``DataError``): its files are not a prepare's to replace; so
is, on a re-run, a file at an unfinished input's output name that holds other bytes than that input gives (a
killed run's last outputs hold the same bytes and are written again).

Parallelism (``workers`` > 1): a worker that pickles (its detector given as a spec string, built again in each
process) runs in spawned processes; one that does not (a Haar or ONNX detector instance, a lambda) runs in a
thread pool and must be thread-safe (visrec's detectors are). Workers decode and compute; the main process
writes files and the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from visrec._files import check_regular_file, replacing, writing_into
from visrec._structured import loads_json
from visrec.data.images import IMAGE_SUFFIXES, encode_jpeg, not_an_image_reason
from visrec.data.products import (CATALOGUE_DIR, PRODUCT_LABELS, _resize, pad_to_square, read_image_checked,
                                  write_product_labels)
from visrec.data.text import FolderClaim
from visrec.errors import ConfigError, DataError, StorageError, VisrecError, shown

JOURNAL = "prepare_journal.jsonl"
REPORT = "prepare_report.json"

Progress = Callable[[int, int], None]  # progress(done, total), called once per input


@dataclass
class PrepareReport:
    """What a preparer did, over every run of the same ``out`` (the journal's whole history).

    ``total``: inputs found now; ``written``: outputs written; ``resumed``: inputs skipped this run because
    an earlier run finished them. Problem lists hold input paths (relative to ``src``, or as the CSV names
    them): ``no_face`` paths; ``multiple_faces`` ``{"path", "faces", "action"}`` (action ``"kept largest"``,
    ``"kept central"`` or ``"skipped"``); ``unreadable`` ``{"path", "error"}``; ``bad_annotation``
    ``{"path", "error"}`` (landmarks); ``skipped`` ``{"path", "reason"}`` for what is not prepared: files that
    are not images, hidden entries and loose files of a faces folder, links not followed (and WFLW lines whose
    image is not there);
    ``box_crops``: paths cropped from the box without points (faces with ``box_margin``)."""

    kind: str
    output: str | None = None
    total: int = 0
    written: int = 0
    resumed: int = 0
    no_face: list[str] = field(default_factory=list)
    multiple_faces: list[dict] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    bad_annotation: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    box_crops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------- shared machinery

def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a hidden temporary file beside ``path``, then rename (readers never see a partial file;
    visrec's folder readers skip hidden files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


class Journal:
    """``out/prepare_journal.jsonl``: a ``{"settings": ...}`` line, then one record per finished input."""

    def __init__(self, out: Path, settings: dict, retry_problems: bool = False):
        self.path = out / JOURNAL
        self.records: dict[str, dict] = {}
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a place the up-front checks passed that takes no folder (/proc as root)
            raise StorageError.from_os(exc, out, action="make the output folder") from None
        # one run at a time in a folder (two would each find no journal and write crops of both settings),
        # held until finish_report or a failure in run_items
        self.claim = FolderClaim(out, "prepare run")
        try:
            self._read(out, settings, retry_problems)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the claim on the output folder."""
        self.claim.close()

    def _read(self, out: Path, settings: dict, retry_problems: bool) -> None:
        known, other = False, None
        if not self.path.exists():
            # outputs are written over by name: a folder that holds files but no journal holds someone
            # else's (a data set, an earlier run's other output), which this run would replace
            try:
                found = next(iter(out.iterdir()), None) if out.is_dir() else None
            except OSError as exc:
                raise DataError(f"cannot list the output folder: {exc.strerror or exc}", path=out) from None
            if found is not None:
                raise DataError(f"the output folder is not empty (it holds {found.name}) and has no {JOURNAL} of "
                                "an earlier prepare to resume: files there would be replaced; name a new or "
                                "empty --out", path=out)
        if self.path.exists():
            text = check_regular_file(self.path).read_text()
            if not text.endswith("\n"):  # a line torn by a crash: dropped, so that input is done again
                text = text[:text.rfind("\n") + 1]
                atomic_write(self.path, text)
            for lineno, line in enumerate(text.splitlines(), 1):
                try:
                    rec = loads_json(line)
                except ValueError as exc:  # not JSON, or nested too deep
                    raise DataError(f"not a JSON line ({exc})", path=self.path, record=f"line {lineno}") from None
                if not _journal_record(rec):  # {} or [1, 2] ended the run in a KeyError / TypeError
                    raise DataError(f"not a journal record: {shown(rec, 80)} (expected {{\"settings\": {{...}}}} or "
                                    f"{{\"key\": ..., \"status\": ..., ...}})", path=self.path, record=f"line {lineno}")
                if "settings" in rec:
                    other = rec["settings"] if rec["settings"] != settings else None
                    known = True
                else:
                    self.records[rec["key"]] = rec
            if known and other is not None:
                if self.records:
                    raise VisrecError(f"{out} was prepared with other settings ({other}, now {settings}); use a "
                                      f"new output folder or the same settings")
                # a run that wrote nothing (it stopped before its first input) binds no settings
                atomic_write(self.path, "")
                known = False
        if not known:
            self.add({"settings": settings})
        if retry_problems:
            self.records = {k: r for k, r in self.records.items() if r["status"] == "ok"}

    def done(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        with writing_into(self.path), open(self.path, "a") as fh:  # a full disk: a StorageError naming it
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if "key" in record:
            self.records[record["key"]] = record


def _journal_record(rec) -> bool:
    """Whether a parsed journal line is one this module writes: the settings, or an input's record (its key and
    status as text, its output file as text or absent)."""
    if not isinstance(rec, dict):
        return False
    if "settings" in rec:
        return isinstance(rec["settings"], dict)
    return (isinstance(rec.get("key"), str) and isinstance(rec.get("status"), str)
            and (rec.get("out") is None or isinstance(rec["out"], str)))


MAX_NAME_BYTES = 150  # of a name safe_name makes: room for a suffix, '_2' and a temporary name's 25 within 255


def safe_name(name: str) -> str:
    """A file/folder name from free text: path separators, commas and leading dots become ``_``; a name longer
    than :data:`MAX_NAME_BYTES` in UTF-8 is cut and ends in ``~`` and 8 hex digits of the full name's hash, so
    two long names stay two (a 238-byte photo name plus the temporary name's suffix passed the file system's
    255-byte limit, on every rerun)."""
    name = re.sub(r"[\\/,\x00-\x1f]", "_", name.strip()).lstrip(".")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_NAME_BYTES:
        cut = raw[:MAX_NAME_BYTES - 9].decode("utf-8", "ignore")  # whole characters only
        name = f"{cut}~{hashlib.sha1(raw).hexdigest()[:8]}"
    return name or "_"


def entries_not_read(src: Path, entries: Sequence[Path]) -> list[dict]:
    """What a recursive listing of ``src`` (``entries``: the preparer's own ``sorted(src.rglob("*"))``) leaves
    out without a word, as skipped report rows: a link to a folder (not followed), a broken link, and a device
    or pipe (a link to /dev/zero named .jpg)."""
    rows = []
    for p in entries:
        if p.is_dir() and not p.is_symlink() or p.is_file():
            continue
        if p.is_symlink() and p.is_dir():
            reason = "a link to a folder: not followed (copy the folder, or link its photos one by one)"
        elif p.is_symlink() and not p.exists():
            reason = "a broken link"
        else:
            reason = "not a regular file (a device or a pipe)"
        rows.append({"path": shown_path(rel_key(p, src)), "reason": reason})
    return rows


def check_distinct_labels(labels, what: str, where: str | Path) -> None:
    """Refuse (``DataError`` naming ``where``) two different labels that :func:`safe_name` writes as one name:
    ``a,b`` and ``a_b``, or `` carol`` and ``carol``, would silently become one person or product."""
    seen: dict[str, str] = {}
    for label in sorted(set(labels)):
        other = seen.setdefault(safe_name(label), label)
        if other != label:
            raise DataError(f"{what} {shown(other)} and {shown(label)} would both be written as "
                            f"{shown(safe_name(label))} (separators, commas, spaces around and leading dots are "
                            f"replaced): rename one", path=where)


def assign_names(keys: Sequence[str], wanted: Sequence[str], journal: Journal) -> dict[str, str]:
    """Output file per input key: the journal's for done inputs, else ``wanted`` made unique (``_2``, ...)."""
    taken = {r["out"] for r in journal.records.values() if r.get("out")}
    names = {}
    for key, name in zip(keys, wanted):
        if journal.done(key) and journal.records[key].get("out"):
            names[key] = journal.records[key]["out"]
            continue
        stem, dot, ext = name.rpartition(".")
        candidate, k = name, 1
        while candidate in taken:
            k += 1
            candidate = f"{stem}_{k}.{ext}" if dot else f"{name}_{k}"
        taken.add(candidate)
        names[key] = candidate
    return names


_WORKER = None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_workers(workers) -> None:
    """Refuse (``ConfigError``) a worker count below 1 or above the cores this process may use: the work is
    CPU-bound, so more workers only add memory (each spawned worker builds its own detector, ~650 MB with a dlib
    or ONNX model; ``--workers 500`` asked for 300 GB)."""
    cores = usable_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= cores:
        raise ConfigError(f"workers {workers!r}: a whole number from 1 to {cores} (the cores this process may use; "
                          "more workers than cores only add memory)")


def _exit_with(parent: int) -> None:
    # a spawned worker waits on its task queue, whose write end it holds too: when the parent is killed outright
    # (kill -9, the OOM killer) that queue never ends, and the worker would sleep on forever holding its memory
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(worker, parent: int) -> None:
    global _WORKER
    import threading

    import cv2

    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()
    cv2.setNumThreads(1)  # the pool is the parallelism
    _WORKER = worker


def _call_worker(item):
    return _WORKER(item)


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # any object may refuse in its own way
        return False


def _map(worker, items: list, workers: int) -> Iterator:
    """``worker(item)`` for each item, in order: inline, in processes (when ``worker`` pickles) or threads."""
    if workers <= 1 or len(items) <= 1:
        yield from map(worker, items)
        return
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if _picklable(worker):
        import multiprocessing

        # spawn: the parent may hold threads (torch, OpenCV) that fork would copy in a locked state
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(worker, os.getpid()))
        results = pool.map(_call_worker, items, chunksize=max(1, min(16, len(items) // (4 * workers))))
    else:
        pool = ThreadPoolExecutor(workers)
        results = pool.map(worker, items)
    try:
        yield from results
    finally:  # on an error or interrupt, drop the queued inputs instead of finishing them unseen
        pool.shutdown(wait=True, cancel_futures=True)


def _check_not_theirs(path: Path, content: bytes | str) -> None:
    """Refuse (``DataError``) to replace a file at an unfinished input's output name unless it holds the very
    bytes this input gives: those are a killed run's (the write lands before its journal line, and an input
    gives the same bytes every time); other bytes are a file someone put there after the last run."""
    try:
        if not path.is_file():
            return
        data = content.encode() if isinstance(content, str) else content
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError as exc:
        raise DataError(f"cannot check what is there before writing: {exc.strerror or exc}", path=path) from None
    raise DataError("holds a file an earlier prepare did not write, and an input of this run is written under "
                    "that name: move the file out of the output folder, then run again (finished inputs are kept)",
                    path=path)


def run_items(worker, items: list[tuple], journal: Journal, out_dir: Path, report: PrepareReport,
         workers: int, progress: Progress | None) -> None:
    """Process the items not in the journal; write each result's ``data`` to ``out_dir / out`` and journal it.
    Items are ``(key, ...)`` tuples; a result is a dict with ``status`` and optional ``data`` (bytes) and
    ``files`` (extra ``{relative path: bytes|str}``)."""
    total = len(items)
    todo = [it for it in items if not journal.done(it[0])]
    report.total, report.resumed = total, total - len(todo)
    done = report.resumed
    if progress and done:
        progress(done, total)
    try:
        for item, result in zip(todo, _map(worker, todo, workers)):
            key, rel = item[0], item[1]
            data = result.pop("data", None)
            writes = list(result.pop("files", {}).items()) + ([(rel, data)] if data is not None else [])
            for name, content in writes:
                _check_not_theirs(out_dir / name, content)
            for name, content in writes:
                atomic_write(out_dir / name, content)
            journal.add({"key": key, "out": rel if data is not None else None, **result})
            done += 1
            if progress:
                progress(done, total)
    except BaseException:
        journal.close()  # a failed run's claim goes now, not when its traceback is freed
        raise


def _fill_report(report: PrepareReport, journal: Journal) -> PrepareReport:
    for key, r in journal.records.items():
        status = r["status"]
        if status == "ok":
            report.written += 1
        elif status == "no_face":
            report.no_face.append(key)
        elif status in ("unreadable", "bad_annotation"):
            getattr(report, status).append({"path": key, "error": r["error"]})
        if r.get("faces", 0) > 1:
            report.multiple_faces.append({"path": key, "faces": r["faces"], "action": r["action"]})
        if r.get("box_crop"):
            report.box_crops.append(key)
    return report


def finish_report(report: PrepareReport, journal: Journal, out: Path) -> PrepareReport:
    _fill_report(report, journal)
    atomic_write(out / REPORT, json.dumps(report.to_dict(), indent=2) + "\n")
    journal.close()
    return report


def rel_key(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


# ----------------------------------------------------------------------------------------- products

class _ProductWorker:
    def __init__(self, size: int | None, fill: int, quality: int):
        self.size, self.fill, self.quality = size, fill, quality

    def __call__(self, item: tuple[str, str, str]) -> dict:
        key, _, path = item
        try:
            image = read_image_checked(key, path)
            square = pad_to_square(image, self.fill)
        except DataError as exc:
            return {"status": "unreadable", "error": exc.message}
        if self.size is not None:
            square = _resize(square, self.size)
        return {"status": "ok", "data": encode_jpeg(square, self.quality)}


MAX_CROP_SIDE = 4096  # pixels of a prepared image's side (the model contract's bound on an input side)
NOT_UTF8 = "its name is not UTF-8 text (the lists and the report are UTF-8): rename it"


def utf8_text(text: str) -> bool:
    """Whether ``text`` is UTF-8 text: a file name of other bytes reaches Python with surrogate escapes."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_path(path: str) -> str:
    """``path`` as UTF-8 text for a report: a byte that is not UTF-8 shown as U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def check_crop_options(*, size: int | None = None, margin: float | None = None, margin_name: str = "margin") -> None:
    """The output side (``size``, pixels) and the margin per side (a fraction of the face box) of a preparer,
    checked before any work: a side of a million pixels asked for a 3 TB crop, a negative margin divided by
    zero, and a NaN one wrote flat grey crops listed as ok."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= MAX_CROP_SIDE):
        raise ConfigError(f"size {size!r}: a whole number of pixels from 8 to {MAX_CROP_SIDE}")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not 0.0 <= float(margin) <= 2.0):  # NaN fails the comparison too
        raise ConfigError(f"{margin_name} {margin!r}: a fraction of the face box per side, from 0 to 2")


def prepare_products(src: str | Path, out: str | Path, *, size: int | None = 512, fill: int = 255,
                     quality: int = 95, workers: int = 1, retry_problems: bool = False,
                     progress: Progress | None = None) -> PrepareReport:
    """Product photos -> ``out/catalogue/<id>.jpg``: padded to a square with ``fill`` (white;
    ``products.pad_to_square``) and resized to ``size`` x ``size`` pixels (None keeps the padded size).

    ``src`` holds photos (id = file stem) and/or one sub-folder per product (id = ``<folder>_<stem>``; then
    ``out/catalogue_products.csv`` maps every catalogue id to its product: the folder name, or the id itself
    for loose photos). Photos deeper down are listed in ``report.skipped``, not prepared. Ids lose commas and
    path separators. Resumable like ``prepare_faces``."""
    check_crop_options(size=size)
    check_workers(workers)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError("product photo folder not found", path=src)
    photos, product, nested, not_utf8 = [], {}, [], []
    entries = sorted(src.rglob("*"))  # listed once: a catalogue may hold half a million photos
    for p in entries:
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(src)
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not utf8_text(rel.as_posix()):
            not_utf8.append(shown_path(rel.as_posix()))
            continue
        if len(rel.parts) > 2:
            nested.append(rel.as_posix())
            continue
        photos.append(p)
        cid = safe_name(p.stem if len(rel.parts) == 1 else f"{rel.parts[0]}_{p.stem}")
        product[rel.as_posix()] = (cid, safe_name(rel.parts[0]) if len(rel.parts) == 2 else cid)
    check_distinct_labels([Path(k).parts[0] for k in product if len(Path(k).parts) == 2], "product folders", src)
    keys = [rel_key(p, src) for p in photos]
    settings = {"kind": "products", "size": size, "fill": fill}
    journal = Journal(out, settings, retry_problems)
    names = assign_names(keys, [f"{CATALOGUE_DIR}/{product[k][0]}.jpg" for k in keys], journal)
    report = PrepareReport("products", str(out / CATALOGUE_DIR))
    skipped = [p for p in entries if p.is_file() and not p.name.startswith(".")
               and p.suffix.lower() not in IMAGE_SUFFIXES]
    report.skipped = [{"path": shown_path(rel_key(p, src)), "reason": not_an_image_reason(p)} for p in skipped]
    report.skipped += [{"path": k, "reason": NOT_UTF8} for k in not_utf8] + entries_not_read(src, entries)
    report.skipped += [{"path": k, "reason": "nested deeper than one product folder (src/<product>/<photo>)"}
                       for k in nested]
    run_items(_ProductWorker(size, fill, quality), [(k, names[k], str(p)) for k, p in zip(keys, photos)], journal,
         out, report, workers, progress)
    if any(len(Path(k).parts) == 2 for k in keys):
        labels = {Path(r["out"]).stem: product[k][1] for k, r in journal.records.items()
                  if r["status"] == "ok" and k in product}
        write_product_labels(out / PRODUCT_LABELS, labels)
    return finish_report(report, journal, out)
