"""The one owner of an output: layout, schemas, frame ids, atomic writes, the single-writer lease, done ids,
counts, the job record and job states. Everything else reads and writes an output through this module.

    OUTPUT/frames/*.parquet    one row per sampled frame, exactly once (readers glob these)
    OUTPUT/errors/*.parquet    one row per input, segment or frame that failed (latest run's view of them), at
                               every moment: a run does not write again a failure an earlier run's row records
    OUTPUT/_recurring/         a run's rows of failures an earlier run's rows record: they replace those rows when
                               the run completes (`Output.write_errors`, `Output.settle_errors`)
    OUTPUT/_job.json           spec (secrets redacted), identity, model, versions, state, counts
    OUTPUT/_sources.parquet    each source's canonical URI, size and version (ETag/mtime) when first read, the
                               work units its probe found, and of a changed source left so the size and version
                               it was seen at (pipeline.known)
    OUTPUT/_lease.json         the single writer's lease: owner, host, pid, heartbeat
    OUTPUT/_lease.lock         what a local output's writers `flock` to take the lease
    OUTPUT/_tmp/               files being written (local outputs); never under frames/ or errors/

Invariants: a Parquet file becomes visible only complete (written under `_tmp/` then renamed, or one PUT on
object storage), under a name derived from what it holds, so a retried task writes the same name again; one
writer holds the lease while it writes; `_job.json` is replaced atomically. Imports neither torch nor Ray, so
`fpn status` and `fpn query` stay light.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import (check_endpoint, exception_chain, filesystem, first_line, join, one_line, parquet_files,
                      protocol_of, redact_text, translate_error)

__all__ = [
    "DETECTION_TYPE", "FRAME_SCHEMA", "ERROR_SCHEMA", "frame_schema", "frame_id", "frames_file", "Output", "Lease",
    "OutputBusyError", "OutputSettingsError", "STATES", "EXIT_CODES", "LEASE_TIMEOUT_S", "final_state", "error_row",
    "check_output_location",
]

log = logging.getLogger(__name__)

DETECTION_TYPE = pa.struct([
    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
    ("score", pa.float32()), ("label", pa.int32()), ("label_name", pa.string()), ("level", pa.int8()),
    # the box in the CRS of a georeferenced raster (its envelope, through the affine transform); null otherwise
    ("map_x1", pa.float64()), ("map_y1", pa.float64()), ("map_x2", pa.float64()), ("map_y2", pa.float64()),
])
MASKED_DETECTION_TYPE = pa.struct(list(DETECTION_TYPE) + [pa.field("mask", pa.struct([
    ("size", pa.list_(pa.int32())), ("counts", pa.string())]))])

FRAME_SCHEMA = pa.schema([
    ("frame_id", pa.string()), ("source", pa.string()), ("source_kind", pa.string()),
    ("frame_index", pa.int64()), ("pts_s", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("num_detections", pa.int32()), ("detections", pa.list_(DETECTION_TYPE)), ("model", pa.string()),
    # window of a large raster this row covers (the whole frame otherwise)
    ("window_x", pa.int32()), ("window_y", pa.int32()), ("window_width", pa.int32()), ("window_height", pa.int32()),
    # georeferenced rasters: CRS ("EPSG:n" or WKT) and affine transform a..f (source pixels -> map); null otherwise
    ("crs", pa.string()), ("transform", pa.list_(pa.float64())),
    ("all_nodata", pa.bool_()),  # a raster window without a valid pixel: not run through the model
    ("stac_item", pa.string()), ("datetime", pa.timestamp("us", tz="UTC")),  # STAC inputs: the item and its time
    # frames the decoder decoded to produce this one: itself and those before it since its unit's previous sampled
    # frame (1 for images and raster windows); summed in `_job.json` as decoded frames per sampled frame
    ("decoded_frames", pa.int32()),
])
ERROR_SCHEMA = pa.schema([
    # frame_index: the video frame (or raster window, as `frames` numbers them) a decode or detect error is at; for
    # a raster's windows that could not be read, the first of them; null for a probe error and an image's decode error
    ("source", pa.string()), ("stage", pa.string()), ("frame_index", pa.int64()),
    ("error_type", pa.string()), ("message", pa.string()),
])
# `_recurring/`'s rows: an error row, and the frame indices of the earlier rows of its source and stage it replaces
RECURRING_SCHEMA = ERROR_SCHEMA.append(pa.field("replaces", pa.list_(pa.int64())))
SOURCES_SCHEMA = pa.schema([("source", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                            ("first_run", pa.int32()),
                            # what a probe found in it (pipeline.known): its work units (JSON) or why nothing in it
                            # is read, cut under the settings `probe_key` names; null: not probed yet, or failed
                            ("probe_key", pa.string()), ("units", pa.string()), ("unread", pa.string()),
                            # a source changed since its frames were written and left so, its SourceChanged row
                            # written (pipeline.known.LEFT_FIELDS): the size and version it was seen at, that run;
                            # null: not changed, or processed again
                            ("left_size", pa.int64()), ("left_version", pa.string()), ("left_run", pa.int32())])

# files of an output read at once (s3fs's pool holds as many connections: pipeline.storage.filesystem)
READ_THREADS = 32
FRAMES_DIR, ERRORS_DIR = "frames", "errors"  # OUTPUT/<name>/*.parquet: the frame rows, the error rows
JOB_RECORD, LEASE_RECORD = "_job.json", "_lease.json"  # OUTPUT/<name>: the job's record, the writer's lease
SOURCES_RECORD, LEASE_LOCK, TMP_DIR, RECURRING_DIR = "_sources.parquet", "_lease.lock", "_tmp", "_recurring"
# every name the layout (the module docstring) puts in a local output's directory: one holding others is no output
OUTPUT_ENTRIES = frozenset({FRAMES_DIR, ERRORS_DIR, JOB_RECORD, SOURCES_RECORD, LEASE_RECORD, LEASE_LOCK, TMP_DIR,
                            RECURRING_DIR})
# the error rows as a person reads them: the query that fpn run's summary, fpn status and fpn report point to
ERRORS_QUERY = "SELECT source, stage, error_type, message FROM errors"
_OBJECT_STORES = {"s3", "gcs", "az", "abfs", "adl", "oss", "r2"}

# Job states, defined once: `_job.json`, the run summary, `fpn status` and `fpn list` all use these.
STATES = {
    "running": "a writer holds the output's lease and is working",
    "succeeded": "every planned frame was written and nothing failed",
    "finished_with_errors": "the job went through every input; some inputs, segments or frames are error rows",
    "failed": "the job stopped on an error, or every input failed and no frame was written",
    "cancelled": "stopped on request (Ctrl-C, SIGTERM, fpn cancel); fpn resume continues it",
    "interrupted": "the writer vanished (killed, node lost) without recording an end; fpn resume continues it",
}
EXIT_CODES = {"running": 0, "succeeded": 0, "failed": 1, "finished_with_errors": 3, "interrupted": 4,
              "cancelled": 130}
LEASE_TIMEOUT_S = 120.0  # a lease without a heartbeat for this long is taken over (env FPN_LEASE_TIMEOUT_S)


def final_state(*, frames: int, errors: int) -> str:
    """The state of a run that went through all its work."""
    if errors == 0:
        return "succeeded"
    return "finished_with_errors" if frames else "failed"


def frame_schema(with_masks: bool = False) -> pa.Schema:
    if not with_masks:
        return FRAME_SCHEMA
    i = FRAME_SCHEMA.get_field_index("detections")
    return FRAME_SCHEMA.set(i, pa.field("detections", pa.list_(MASKED_DETECTION_TYPE)))


def frame_id(source: str, frame_index: int) -> str:
    """Deterministic id of a sampled frame (or raster window): a pure function of the source's canonical URI
    (`pipeline.storage.canonical_uri`: the same object however its path was spelled) and the index."""
    return hashlib.sha1(f"{source}\x00{frame_index}".encode()).hexdigest()[:24]


def frames_file(ids: list[str]) -> str:
    """The name (relative to the output) of the frames file holding exactly the frames `ids`: the hash of the
    sorted ids, so whoever writes the same frames again writes the same name."""
    h = hashlib.sha1()
    for i in sorted(ids):
        h.update(i.encode())
    return f"{FRAMES_DIR}/part-{h.hexdigest()[:20]}.parquet"


def error_row(source: str, stage: str, e: BaseException | str, frame_index: int | None = None,
              error_type: str | None = None) -> dict:
    """One `errors` row; the message is its first line (`storage.first_line`), with URLs' signatures and secrets
    redacted."""
    msg = first_line(e) if isinstance(e, BaseException) else (e.splitlines()[0] if e else "")
    return {"source": source, "stage": stage, "frame_index": frame_index,
            "error_type": error_type or type(e).__name__, "message": redact_text(msg)}


class OutputBusyError(RuntimeError):
    """Another writer holds the output's lease."""


class OutputSettingsError(ValueError):
    """The output holds frames made with other settings (model and its overrides, tiles, raster windows, ...): its
    frames' detections, or a raster's window ids, would not mean the same as this job's, so a job does not add to
    it. `differences`: what differs, as "field old -> new; ..."."""

    def __init__(self, output: str, differences: str):
        super().__init__(f"{output} holds frames made with other settings ({differences}): write to a new output "
                         "(an output's frames are all of one model and its settings)")
        self.differences = differences


def check_output_location(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse an output on object storage whose bucket does not exist (FileNotFoundError), cannot be
    reached (ConnectionError) or is forbidden (PermissionError), and a local output that is a file or a directory
    of other files (ValueError), before any work starts.

    fpn never creates buckets (a typo would otherwise make one, possibly public, in the wrong
    account): this only looks, and s3fs's `mkdir`/`makedirs`, which create buckets, must never be
    called on object storage. A local output's directory is created when written.
    """
    proto = protocol_of(url)
    fs, path = filesystem(url, storage_options)
    if proto not in _OBJECT_STORES:
        if fs.exists(path) and not fs.isdir(path):
            raise ValueError(f"output {url} is a file: an output is a directory (a new one, or an fpn output)")
        entries = set(os.listdir(path)) if fs.isdir(path) else set()
        others = sorted(entries - OUTPUT_ENTRIES)
        if others and not {JOB_RECORD, FRAMES_DIR} & entries:  # a folder of images, say: it wrote among them
            raise ValueError(f"output {url} is a directory of other files ({len(others)}: "
                             f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): an output is a directory "
                             "of its own (a new one, or an fpn output)")
        return
    bucket = path.strip("/").split("/", 1)[0]
    what = f"output {url}"
    check_endpoint(url, storage_options, what)
    try:
        if proto == "s3":
            fs.call_s3("head_bucket", Bucket=bucket)
        elif not fs.exists(bucket):
            raise FileNotFoundError(f"{what}: bucket {bucket} does not exist")
    except FileNotFoundError as e:
        raise FileNotFoundError(
            redact_text(f"{what}: bucket {bucket} does not exist (fpn never creates buckets)")) from e
    except Exception as e:
        raise translate_error(e, what) from e


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class Output:
    """An output location: `Output(url, storage_options, run=N)` (`run`: the number of the run writing, which
    names its error files). Picklable (it keeps the URL and options, and what `recall_errors` found, and makes
    its filesystem when first used), so Ray tasks and actors write through it too."""

    def __init__(self, url: str, storage_options: dict | None = None, *, run: int = 0,
                 recorded: dict[tuple[str, str], frozenset] | None = None):
        self.url, self.storage_options, self.run = url.rstrip("/") or url, storage_options, run
        # the frame indices of earlier runs' error rows, by source and stage (`recall_errors`)
        self.recorded = recorded or {}
        self._fs = None
        self._read: dict[str, _FileSummary] = {}  # frames files read, by path (`_summary`)

    def as_run(self, run: int) -> "Output":
        """This output as run `run` writes it, sharing its filesystem and what was read of its frames files."""
        other = Output(self.url, self.storage_options, run=run)
        other._fs, other._read = self._fs, self._read
        if self._fs is not None:
            other._path = self._path
        return other

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options, "run": self.run, "recorded": self.recorded}

    def __setstate__(self, state):
        self.__init__(state["url"], state["storage_options"], run=state["run"], recorded=state.get("recorded"))

    @classmethod
    def for_reading(cls, url: str, storage_options: dict | None = None) -> "Output":
        """An existing output to read (`fpn status`, `resume`, `query`, `report`, `export`), its S3 endpoint
        checked first: one that refuses connections is said at once, as "output URL: cannot reach ...", not after
        botocore's and s3fs's retries (80 s; `storage.check_endpoint`)."""
        check_endpoint(url, storage_options, f"output {url}")
        return cls(url, storage_options)

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._path = filesystem(self.url, self.storage_options)
        return self._fs

    @property
    def path(self) -> str:
        self.fs  # noqa: B018 - resolves the path with the filesystem
        return self._path

    def _p(self, *parts: str) -> str:
        return join(self.path, *parts)

    # -- atomic writes ----------------------------------------------------------------------------
    def _put(self, data: bytes, rel: str, *, before_commit: Callable[[], None] | None = None) -> None:
        """Make `OUTPUT/rel` hold `data`, visible only complete: locally a file under `_tmp/` renamed into
        place; on object storage one PUT (never `makedirs`: s3fs creates buckets). `before_commit` runs just
        before the file becomes visible (and can stop it by raising)."""
        fs, dest = self.fs, self._p(rel)
        if not _is_local(self.url):
            if before_commit is not None:
                before_commit()
            fs.pipe_file(dest, data)
            return
        tmpdir = self._p(TMP_DIR)
        fs.makedirs(tmpdir, exist_ok=True)
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        tmp = join(tmpdir, f"{uuid.uuid4().hex}-{rel.rsplit('/', 1)[-1]}")
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            if before_commit is not None:
                before_commit()
            os.replace(tmp, dest)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)

    def _read_small(self, rel: str) -> bytes:
        """The whole of a small record that its writer replaces while others read it (`_lease.json` at each
        heartbeat, `_job.json`): one GET. `fs.open` on s3fs is a HEAD and then GETs with `If-Match` on the ETag
        it saw, so a replacement landing in between failed the read (PreconditionFailed), and with it the
        fenced write task that asked, and the job."""
        return self.fs.cat_file(self._p(rel))

    def write_table(self, table: pa.Table, rel: str, *, before_commit: Callable[[], None] | None = None) -> None:
        self._read.pop(self._p(rel), None)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self._put(sink.getvalue().to_pybytes(), rel, before_commit=before_commit)

    def write_frames(self, table: pa.Table, *, fence: str | None = None) -> int:
        """A frames file named by the hash of its frame ids (a retried task rewrites the same name).

        `fence`: the lease token of the run writing (its `Lease.record["token"]`). The file is committed only
        while that lease still holds the output; after a takeover (`fpn resume` once this writer's heartbeat went
        stale) it raises `OutputBusyError` and writes nothing, since the new writer plans these frames again and
        would write them under other names."""
        if not table.num_rows:
            return 0
        check = None if fence is None else (lambda: self._check_fence(fence, table.num_rows))
        self.write_table(table, frames_file(table.column("frame_id").to_pylist()), before_commit=check)
        return table.num_rows

    def lease_token(self) -> str | None:
        """The token of the lease now recorded on the output (None: no lease)."""
        try:
            return json.loads(self._read_small(LEASE_RECORD)).get("token")
        except FileNotFoundError:
            return None
        except ValueError:  # torn record (only without conditional writes): no writer can be named
            return None

    def _check_fence(self, token: str, rows: int) -> None:
        now = self.lease_token()
        if now != token:
            raise OutputBusyError(f"{self.url}: this run's lease was taken over by another writer (or released); "
                                  f"{rows} frames not written: the writer holding the output now writes them")

    def write_empty_frames(self, *, with_masks: bool = False) -> None:
        """A zero-row frames file, so readers of an output without frames still find the schema."""
        self.write_table(frame_schema(with_masks).empty_table(), f"{FRAMES_DIR}/part-empty.parquet")

    def recall_errors(self, sources: set[str]) -> None:
        """Note which failures earlier runs' error rows record of `sources` (canonical URIs: this run's), before this
        run writes any error row (`write_errors`). Reads the three columns of every error file of earlier runs."""
        def read(f: str) -> list[dict]:
            return self._table(f, ["source", "stage", "frame_index"]).to_pylist()

        recorded: dict[tuple[str, str], set] = {}
        for rows in self._read_each(read, [f for f in self.error_files() if _error_run(f) < self.run]):
            for r in rows:
                if r["source"] in sources:
                    recorded.setdefault((r["source"], r["stage"]), set()).add(r["frame_index"])
        self.recorded = {k: frozenset(v) for k, v in recorded.items()}

    def write_errors(self, rows: list[dict], key: str, scopes: list | None = None) -> None:
        """Error rows of one unit of work in this run, under a name from `key` (a retry rewrites it).

        A failure that an earlier run's row records (`recall_errors`) is not written to `errors/` again: a rerun or
        `fpn resume` does every unit with a frame to write again, the failed ones among them, and `errors` held each
        of their failures twice until the run completed, and for good when it was stopped before. That row stands
        for it meanwhile, so that `errors` holds one row per failure at every moment and after any crash (no object
        store renames or writes two objects at once: adding one row and removing another cannot be one step). The
        row goes to `_recurring/` instead, naming the earlier rows it replaces when the run completes
        (`settle_errors`). An earlier row records a failure of this row's when it is of the same source and stage
        and its frame index is in `scopes[i]` (the frames of the row's unit of work), or, where that is None, is the
        row's own (a probe's and an image's: null; a detect error's frame)."""
        new, again = [], []
        for row, scope in zip(rows, scopes or [None] * len(rows)):
            known = self.recorded.get((row["source"], row["stage"]), ())
            replaces = [i for i in known if (i == row.get("frame_index") if scope is None else i in scope)]
            if replaces:
                again.append({**row, "replaces": replaces})
            else:
                new.append(row)
        name = self._error_file(key)
        if new:
            self.write_table(pa.Table.from_pylist(new, schema=ERROR_SCHEMA), f"{ERRORS_DIR}/{name}")
        if again:
            self.write_table(pa.Table.from_pylist(again, schema=RECURRING_SCHEMA), f"{RECURRING_DIR}/{name}")

    def settle_errors(self, read: set[str] | None, keep: set[str] = frozenset()) -> int:
        """Make `errors` this run's view of the failures, once it went through all its work: the rows of runs
        before it about the sources it `read` (canonical URIs; None: every one, as when this run's settings
        replaced theirs) go, but for those of failures that happened again, which take their new row in their
        place (`_recurring/`: `write_errors`), and those of sources in `keep` (of `read`: changed sources an earlier
        run left, whose row is still true). Rows of sources this run did not read stay: a daily run over the
        day's new files removed every older run's errors. Each earlier file that changes is written again under its
        name (its run's) with what it keeps, or removed when it keeps nothing: one write each, so no failure is
        without its row, nor has two, whenever a crash stops this. `_recurring/` is emptied last (what runs that
        did not complete left there goes too). Returns the rows kept of sources this run did not read."""
        recurring = self._recurring_files()
        again: dict[tuple, dict] = {}  # (source, stage, frame index of an earlier row) -> the row replacing it
        for f in recurring:
            if _error_run(f) == self.run:
                for r in self._table(f).to_pylist():
                    row = {k: r[k] for k in ERROR_SCHEMA.names}
                    again.update({(r["source"], r["stage"], i): row for i in r["replaces"]})
        placed: set[int] = set()  # ids of the rows of `again` in a file now
        others = 0
        earlier = [f for f in self.error_files() if _error_run(f) < self.run]
        for f, table in zip(earlier, self._read_each(self._table, earlier)):
            kept, changed = [], False
            for r in table.to_pylist():
                if read is not None and (r["source"] not in read or r["source"] in keep):
                    kept.append(r)
                    others += r["source"] not in read
                    continue
                new = again.get((r["source"], r["stage"], r["frame_index"]))
                if new is not None and id(new) not in placed:  # an earlier row of a failure seen again: its new row
                    placed.add(id(new))
                    kept.append(new)
                    changed = changed or new != r
                else:
                    changed = True
            if not changed:
                continue
            if kept:
                self.write_table(pa.Table.from_pylist(kept, schema=ERROR_SCHEMA),
                                 f"{ERRORS_DIR}/{f.rsplit('/', 1)[-1]}")
            else:
                self.fs.rm(f)
        # rows whose earlier rows were gone (nothing removes them meanwhile: never lost if something did)
        left = list({id(r): r for r in again.values() if id(r) not in placed}.values())
        if left:
            self.write_table(pa.Table.from_pylist(left, schema=ERROR_SCHEMA),
                             f"{ERRORS_DIR}/{self._error_file('recurring')}")
        for f in recurring:
            self.fs.rm(f)
        return others

    def _error_file(self, key: str) -> str:
        """The name of this run's error file of `key` (`_error_run` reads the run back)."""
        return f"err-r{self.run:04d}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.parquet"

    def _recurring_files(self) -> list[str]:
        return parquet_files(self.fs, self._p(RECURRING_DIR))

    # -- reading --------------------------------------------------------------------------------
    def frame_files(self) -> list[str]:
        return parquet_files(self.fs, self._p(FRAMES_DIR))

    def error_files(self) -> list[str]:
        return parquet_files(self.fs, self._p(ERRORS_DIR))

    def has_frames(self) -> bool:
        """Whether any frame is written (the footers; an empty frames file holds none)."""
        return any(self._footer(f).num_rows for f in self.frame_files())

    def _footer(self, f: str) -> pq.FileMetaData:
        try:
            with self.fs.open(f, "rb") as fh:
                return pq.ParquetFile(fh).metadata
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same way out
            raise _corrupt(f, e) from e

    def _read_each(self, read: Callable[[str], Any], files: list[str]) -> list[Any]:
        """`read(f)` of each file, in order, `READ_THREADS` at a time: one after the other, each file of an output
        on S3 cost its round trips in turn (an open's HEAD, the footer's GET, the columns' GET), and an archive's
        output holds a file or more for each day it was run."""
        if len(files) < 2:
            return [read(f) for f in files]
        with ThreadPoolExecutor(min(READ_THREADS, len(files))) as pool:
            return list(pool.map(read, files))

    def _summary(self, f: str) -> "_FileSummary":
        """A frames file's frame ids and the sums `counts` takes, read in one open, and kept: its name is the hash
        of its frame ids (`frames_file`), so it holds the same rows for as long as it is there (a rewrite under
        the same name forgets it: `write_table`). A run reads each file once: its ids at the start, the duplicate
        check and the counts at its end read only the files written since (each read them all again)."""
        if f not in self._read:
            try:
                with self.fs.open(f, "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    cols = [c for c in ("frame_id", "num_detections", "all_nodata", "decoded_frames")
                            if c in pf.schema_arrow.names]
                    t = pf.read(columns=cols)
            except Exception as e:  # noqa: BLE001 - any unreadable file gets the same way out
                raise _corrupt(f, e) from e
            total = lambda c: int(pc.sum(t.column(c)).as_py() or 0) if c in cols else None  # noqa: E731
            decoded = total("decoded_frames")  # a file written before it was recorded: one a row
            self._read[f] = _FileSummary(t.column("frame_id").to_pylist(), total("num_detections") or 0,
                                         total("all_nodata") or 0, t.num_rows if decoded is None else decoded)
        return self._read[f]

    def _frame_ids(self) -> list[tuple[str, list[str]]]:
        """Each frames file and its frame ids. A corrupt file is one line naming it and the way out."""
        files = self.frame_files()
        return list(zip(files, (s.ids for s in self._read_each(self._summary, files))))

    def done_ids(self) -> set[str]:
        """Frame ids already written."""
        return {i for _, ids in self._frame_ids() for i in ids}

    def drop_duplicate_frames(self) -> dict[str, int]:
        """Make every frame id appear in one file only, whatever wrote it twice (called by the lease holder when
        its run has written everything; Ray Data's retries give a retried write the same rows, so this is the
        backstop, and normally finds nothing). Files are visited largest first; a file all of whose frames are
        in files already kept is removed; one with some is rewritten without them (the smaller file first, then
        the original removed: no frame is ever missing). Returns {files_removed, files_rewritten, rows_removed}."""
        files = list(self._frame_ids())
        base = lambda f: f.rsplit("/", 1)[-1]  # noqa: E731 - all of them in frames/
        names = {base(f) for f, _ in files}
        seen: set[str] = set()
        stats = {"files_removed": 0, "files_rewritten": 0, "rows_removed": 0}
        for f, ids in sorted(files, key=lambda x: (-len(x[1]), x[0])):
            uniq = set(ids)
            dup = seen & uniq
            if not dup and len(uniq) == len(ids):
                seen |= uniq
                continue
            if dup == uniq:
                self.fs.rm(f)
                names.discard(base(f))
                stats["files_removed"] += 1
                stats["rows_removed"] += len(ids)
                log.warning("%s: all its %d frames are in other files too: removed", f, len(ids))
                continue
            with self.fs.open(f, "rb") as fh:
                t = pq.ParquetFile(fh).read()
            first, rows = set(), []  # each frame not kept elsewhere, once
            for k, i in enumerate(t.column("frame_id").to_pylist()):
                if i not in dup and i not in first:
                    first.add(i)
                    rows.append(k)
            t = t.take(pa.array(rows, pa.int64()))
            rel = frames_file(list(first))
            if base(rel) == base(f) or base(rel) not in names:
                self.write_table(t, rel)
                names.add(base(rel))
                seen |= first
            # else a file not visited yet holds exactly these frames: it stays (and adds them when visited)
            if base(rel) != base(f):
                self.fs.rm(f)
                names.discard(base(f))
            stats["files_rewritten"] += 1
            stats["rows_removed"] += len(ids) - len(rows)
            log.warning("%s: %d of its frames are in other files too: rewritten without them", f,
                        len(ids) - len(rows))
        return stats

    def sources_with_frames(self, candidates: set[str]) -> set[str]:
        """Which of `candidates` have frames in the output (reads the `source` column)."""
        def sources_in(f: str) -> set[str]:
            with self.fs.open(f, "rb") as fh:
                return set(pq.ParquetFile(fh).read(columns=["source"]).column("source").to_pylist()) & candidates

        return set().union(*self._read_each(sources_in, self.frame_files()))

    def drop_frames_of(self, sources: set[str]) -> int:
        """Remove the frames of `sources` (canonical URIs) from the output, so that a run can process their new
        version. A file holding only their frames is removed; one holding others too is written again without
        them (under the name of the frames it keeps) before the original is removed, so no other frame is ever
        missing; a crash between the two leaves both, which the next run's duplicate check resolves. Returns how
        many frames went."""
        dropped = 0
        for f in self.frame_files():
            kept, gone = self._without_sources(f, sources)
            if not gone:
                continue
            if kept.num_rows:
                self.write_table(kept, frames_file(kept.column("frame_id").to_pylist()))
            self.fs.rm(f)
            dropped += gone
        return dropped

    def _table(self, f: str, columns: list[str] | None = None) -> pa.Table:
        """Parquet file `f` (its `columns`, else all); a corrupt file is one line naming it and the way out."""
        try:
            with self.fs.open(f, "rb") as fh:
                return pq.ParquetFile(fh).read(columns=columns)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same way out
            raise _corrupt(f, e) from e

    def _without_sources(self, f: str, sources: set[str]) -> tuple[pa.Table, int]:
        """The rows of Parquet file `f` whose `source` is none of `sources`, and how many rows are left out."""
        table = self._table(f)
        kept = table.filter(pc.invert(pc.is_in(table.column("source"), pa.array(sorted(sources), pa.string()))))
        return kept, table.num_rows - kept.num_rows

    def counts(self) -> dict[str, int]:
        """Frames, detections, raster windows skipped as all nodata and frames decoded (each frames file's
        `_summary`; a file written before `decoded_frames` was recorded counts one per row), and error rows (the
        Parquet footers)."""
        read = self._read_each(self._summary, self.frame_files())
        frames, detections = sum(len(s.ids) for s in read), sum(s.detections for s in read)
        nodata, decoded = sum(s.nodata for s in read), sum(s.decoded for s in read)
        errors = sum(self._rows(self.error_files()))
        return {"frames": frames, "detections": detections, "errors": errors, "nodata_windows": nodata,
                "decoded_frames": decoded}

    def _rows(self, files: list[str]) -> list[int]:
        """The rows of each Parquet file (its footer)."""
        return self._read_each(lambda f: self._footer(f).num_rows, files)

    # -- the job record ---------------------------------------------------------------------------
    def read_job(self, *, missing_ok: bool = False) -> dict:
        """`_job.json` as a dict. Missing: {} with `missing_ok`, else FileNotFoundError. Torn or not JSON:
        ValueError naming it and the way out."""
        try:
            data = self._read_small(JOB_RECORD)
        except (FileNotFoundError, NotADirectoryError):  # the latter: the output's path is a file
            if missing_ok:
                return {}
            raise FileNotFoundError(f"{self.url}: no _job.json (is it an fpn output?)") from None
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            return doc
        except ValueError as e:
            raise ValueError(f"{self.url}/_job.json is not valid JSON ({e}): delete it; the frames stay and the "
                             "next fpn run with the same inputs writes it again") from None

    def write_job(self, doc: dict) -> None:
        self._put(json.dumps(doc, indent=2, default=str).encode(), JOB_RECORD)

    def read_sources(self) -> dict[str, dict]:
        """{canonical source: {size, version, first_run, probe_key, units, unread, left_size, left_version,
        left_run}} of the sources earlier runs read (from probe_key: what a probe found, and of a changed source left
        so when it was seen, `pipeline.known`; absent from outputs written before them)."""
        try:
            data = self._read_small(SOURCES_RECORD)
        except FileNotFoundError:
            return {}
        try:  # a ParquetFile: pq.read_table imports pyarrow.dataset, and pandas with it (0.9 s of a rerun's 1.2)
            rows = pq.ParquetFile(pa.BufferReader(data)).read().to_pylist()
        except Exception as e:  # noqa: BLE001 - any unreadable record gets the same way out
            raise ValueError(
                f"{self._p(SOURCES_RECORD)} is not a readable Parquet file ({one_line(e)}): it records each source's "
                "size and version, by which a run tells a source that changed since its frames were written; "
                "delete it and the next run probes every source again, but a source changed before then is not "
                "seen (its frames here stay of the old version): write to a new output to be sure") from None
        return {r.pop("source"): r for r in rows}

    @staticmethod
    def source_change(old: dict, new: dict) -> str | None:
        """How a source's {size, version} differ from what was recorded of it (None: the same, or not known)."""
        if old.get("size") is not None and new.get("size") is not None and old["size"] != new["size"]:
            return f"size {old['size']} -> {new['size']} bytes"
        if old.get("version") and new.get("version") and old["version"] != new["version"]:
            return f"version {old['version']} -> {new['version']}"
        return None

    def write_sources(self, sources: dict[str, dict]) -> None:
        rows = [{"source": s, **v} for s, v in sorted(sources.items())]
        self.write_table(pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA), SOURCES_RECORD)

    def state(self) -> str | None:
        """The recorded state, with `running` read as `interrupted` when no live lease backs it."""
        doc = self.read_job(missing_ok=True)
        st = doc.get("state")
        if st == "running":
            lease = Lease(self).holder()
            if lease is None or lease.get("stale"):
                return "interrupted"
        return st

    def progress(self, *, now_s: float | None = None, missing_ok: bool = True) -> dict[str, Any]:
        """State, frames written vs planned, errors, rate and ETA, from `_job.json`, the lease and the Parquet
        footers (no row is read); where the run's start went (`startup_s`, as far as it has got). Frames an earlier
        run's sampling took and the job's does not are not counted as done (`frames_outside_plan`). `missing_ok`:
        as `read_job`'s (False: a location without `_job.json` is no output, FileNotFoundError)."""
        doc = self.read_job(missing_ok=missing_ok)
        written = sum(self._rows(self.frame_files())) - doc.get("frames_outside_plan", 0)
        errors = sum(self._rows(self.error_files()))
        planned, state = doc.get("planned_frames"), self.state()
        rate = eta = None
        if state == "running" and doc.get("started_at"):
            t0 = time.mktime(time.strptime(doc["started_at"][:19], "%Y-%m-%dT%H:%M:%S"))
            elapsed = (now_s or time.time()) - t0
            new = written - doc.get("skipped_frames", 0)
            if elapsed > 0 and new > 0:
                rate = new / elapsed
                if planned:
                    eta = max(0.0, (planned - written) / rate)
        elif doc.get("frames_per_s"):
            rate = doc["frames_per_s"]
        return {"state": state, "frames_done": written, "frames_planned": planned, "errors": errors,
                "frames_per_s": rate, "eta_s": eta, "runs": doc.get("runs"), "error": doc.get("error"),
                "startup_s": doc.get("startup_s"), "job_id": doc.get("job_id"), "nothing_new": doc.get("nothing_new"),
                # sources its last run read, and those it left for a later one (min_age_s)
                "inputs": doc.get("inputs"), "not_settled": doc.get("not_settled"),
                "changed_left": doc.get("changed_left"),  # changed sources the last run left: an error row each
                "last_work": doc.get("last_work"),  # of a run with nothing new: the last run that did work
                # of `errors`, earlier runs' about inputs the last run did not read (its state is of its own)
                "errors_of_other_inputs": doc.get("errors_of_other_inputs", 0) if state != "running" else 0}

    # -- housekeeping -----------------------------------------------------------------------------
    def clean_temporary(self) -> int:
        """Remove what killed writers left in `_tmp/` (only the lease holder calls this). Returns files removed."""
        if not _is_local(self.url):
            return 0  # object storage writes are single PUTs: nothing temporary exists
        tmp = self._p(TMP_DIR)
        if not self.fs.exists(tmp):
            return 0
        files = self.fs.find(tmp)
        for f in files:
            self.fs.rm(f)
        return len(files)

    def lease(self, owner: str | None = None, *, timeout_s: float | None = None) -> "Lease":
        return Lease(self, owner=owner, timeout_s=timeout_s)


@dataclass(frozen=True)
class _FileSummary:
    """What `Output._summary` keeps of a frames file."""

    ids: list[str]
    detections: int
    nodata: int  # raster windows all nodata
    decoded: int  # frames decoded to produce its rows


def _error_run(path: str) -> int:
    name = path.rsplit("/", 1)[-1]
    if name.startswith("err-r") and name[5:9].isdigit():
        return int(name[5:9])
    return 0  # files of versions before run numbers: the oldest


def _corrupt(f: str, e: BaseException) -> ValueError:
    """One line naming an unreadable file of the output, and the way out: what the next run then does again."""
    errors = f"/{ERRORS_DIR}/" in f or f"/{RECURRING_DIR}/" in f
    again = ("a complete run writes the rows of the failures that happen again" if errors
             else "the next run detects its frames again")
    return ValueError(f"{f} is not a readable Parquet file ({one_line(e)}): move it out of the output; {again}")


def _process_space() -> str | None:
    """This machine's boot and PID namespace: processes that see each other's PIDs share it (None: unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (a reused PID reads as alive: the heartbeat then decides)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The single-writer lease of an output: `OUTPUT/_lease.json` = {owner, host, pid, token, heartbeat_at}.

    Acquired by a conditional create (locally: under `flock` of `OUTPUT/_lease.lock`, released by the kernel
    even when the holder is SIGKILLed; on S3: PutObject with If-None-Match, and If-Match of the ETag read for a
    takeover or a heartbeat). A lease whose heartbeat is older than `timeout_s` (default 120 s, env
    FPN_LEASE_TIMEOUT_S) is taken over, and at once one whose holder was a process of this machine's process
    space (same boot, same PID namespace) that no longer exists: a killed local run is resumed without waiting.
    The holder refreshes it every `timeout_s / 4` from a daemon thread; if
    it finds the lease taken, it interrupts the main thread (the job stops as `interrupted`: another writer owns
    the output now). Other object stores get the same record without a conditional write (documented race).
    """

    def __init__(self, out: Output, owner: str | None = None, timeout_s: float | None = None):
        self.out = out
        self.timeout_s = float(timeout_s or os.environ.get("FPN_LEASE_TIMEOUT_S") or LEASE_TIMEOUT_S)
        self.record = {"owner": owner or "fpn run", "host": socket.gethostname(), "pid": os.getpid(),
                       "token": uuid.uuid4().hex, "started_at": _iso(time.time()), "processes": _process_space()}
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None
        self._lost = False
        self._held = False

    @property
    def lost(self) -> bool:
        """Whether another writer holds the output now: found by the heartbeat, or, when asked before the next
        beat, by reading the record (a write of this run fenced off by a takeover fails in its task first)."""
        if self._held and not self._lost:
            try:
                rec, _ = self._read()
            except Exception:  # noqa: BLE001 - unreadable now: the heartbeat decides
                return False
            self._lost = rec is None or rec.get("token") != self.record["token"]
        return self._lost

    @property
    def _key(self) -> str:
        return self.out._p(LEASE_RECORD)

    def _s3(self) -> bool:
        return self.out.url.startswith(("s3://", "s3a://"))

    # -- reading ----------------------------------------------------------------------------------
    def _read(self) -> tuple[dict | None, str | None]:
        try:
            # on S3 the ETag before the body: a record that changes in between makes the If-Match of a takeover
            # fail, which refuses (never a second writer)
            etag = self.out.fs.info(self._key, refresh=True)["ETag"] if self._s3() else None
            return json.loads(self.out._read_small(LEASE_RECORD)), etag
        except FileNotFoundError:
            return None, None
        except ValueError:  # torn record (only without conditional writes): treat as stale
            return {"owner": "?", "host": "?", "pid": 0, "token": "", "heartbeat_at": 0}, None

    def _stale(self, rec: dict) -> bool:
        if time.time() - float(rec.get("heartbeat_at", 0)) > float(rec.get("timeout_s", self.timeout_s)):
            return True
        space = rec.get("processes")
        return bool(space) and space == _process_space() and not _alive(int(rec.get("pid") or 0))

    def holder(self) -> dict | None:
        """The current record with `age_s` and `stale` added, or None."""
        rec, _ = self._read()
        if rec is None:
            return None
        return {**rec, "age_s": round(time.time() - float(rec.get("heartbeat_at", 0)), 1), "stale": self._stale(rec)}

    def check_free(self) -> None:
        """Raise OutputBusyError when a live writer holds the output now: a quick refusal before a job starts its
        work (`acquire` decides, atomically)."""
        self._refuse_live(self._read()[0])

    def _refuse_live(self, rec: dict | None) -> None:
        """Raise OutputBusyError naming the holder of lease record `rec` when it is live (not stale)."""
        if rec is not None and not self._stale(rec):
            raise self._busy(rec)

    def _busy(self, rec: dict) -> OutputBusyError:
        age = time.time() - float(rec.get("heartbeat_at", 0))
        return OutputBusyError(
            f"{self.out.url} is being written by {rec.get('owner')} on {rec.get('host')} (pid {rec.get('pid')}), "
            f"last heartbeat {age:.0f} s ago; its lease is taken over after {rec.get('timeout_s', self.timeout_s):.0f}"
            " s without a heartbeat")

    # -- writing ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({**self.record, "heartbeat_at": time.time(), "heartbeat": _iso(time.time()),
                           "timeout_s": self.timeout_s}).encode()

    def _s3_put(self, condition: dict) -> bool:
        fs = self.out.fs
        bucket, key, _ = fs.split_path(self._key)
        try:
            r = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **condition)
        except Exception as e:  # noqa: BLE001
            # s3fs raises a 412 as FileExistsError or OSError(EINVAL), botocore's ClientError as its cause
            refused = isinstance(e, FileExistsError) or any(
                c in str(x) for x in exception_chain(e) for c in ("PreconditionFailed", "ConditionalRequestConflict"))
            if not refused:
                raise
            # botocore retries a PUT whose answer was lost (a connection cut, a 500 after the write): when the
            # first attempt landed, the retry's condition fails against this lease's own record, still held
            rec, etag = self._read()
            if rec is None or rec.get("token") != self.record["token"]:
                return False
            self._etag = etag
            return True
        self._etag = r["ETag"]
        return True

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        import fcntl

        self.out.fs.makedirs(self.out.path, exist_ok=True)
        with open(os.path.join(self.out.path, LEASE_LOCK), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _local_put(self) -> None:
        self.out._put(self._body(), LEASE_RECORD)

    def acquire(self) -> "Lease":
        """Take the lease, or raise OutputBusyError naming the live holder."""
        if self._s3():
            if not self._s3_put({"IfNoneMatch": "*"}):
                rec, etag = self._read()
                self._refuse_live(rec)
                if not self._s3_put({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}):
                    raise self._busy(self._read()[0] or {})
                self.took_over = rec
        elif _is_local(self.out.url):
            with self._flock():
                rec, _ = self._read()
                self._refuse_live(rec)
                self.took_over = rec
                self._local_put()
        else:
            rec, _ = self._read()
            self._refuse_live(rec)
            self.took_over = rec
            self.out._put(self._body(), LEASE_RECORD)
        if self.took_over:
            log.warning("took over the lease of %s from %s on %s (pid %s): no heartbeat for %.0f s", self.out.url,
                        self.took_over.get("owner"), self.took_over.get("host"), self.took_over.get("pid"),
                        time.time() - float(self.took_over.get("heartbeat_at", 0)))
        self._held = True
        self._thread = threading.Thread(target=self._beat, name="fpn-lease", daemon=True)
        self._thread.start()
        return self

    def heartbeat(self) -> bool:
        """Refresh the lease; False (and `lost`) when another writer holds it now."""
        if self._s3():
            ok = self._s3_put({"IfMatch": self._etag})
        else:
            with self._flock() if _is_local(self.out.url) else contextlib.nullcontext():
                rec, _ = self._read()
                ok = rec is not None and rec.get("token") == self.record["token"]
                if ok:
                    self.out._put(self._body(), LEASE_RECORD)
        self._lost = self._lost or not ok
        return ok

    def _beat(self) -> None:
        import _thread

        while not self._stop.wait(self.timeout_s / 4):
            try:
                if not self.heartbeat():
                    log.error("lost the lease of %s to another writer: stopping", self.out.url)
                    _thread.interrupt_main()
                    return
            except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried at the next beat
                log.warning("lease heartbeat of %s failed: %s", self.out.url, redact_text(str(e)))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._lost:
            return
        with self._flock() if _is_local(self.out.url) else contextlib.nullcontext():
            rec, _ = self._read()
            if rec is not None and rec.get("token") == self.record["token"]:
                self.out.fs.rm(self._key)
        self._held = False

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))

