"""A finished cell's result, kept where a later attempt of that cell in the same run finds it.

Ray raises ActorUnavailableError on the driver when it cannot reach an actor for a while (a stalled node, a network
partition, a process paused for minutes), although the actor goes on and finishes the call. The driver then
re-queues the cell (bench.harness.worker.Dispatcher._crashed), and the result of the finished call is lost with the
call. So a worker also writes every result it returns to the artifact cache, keyed by the run id and the cell key,
and an attempt of that cell in that run returns it instead of sampling and evaluating the cell again. (A re-queued
cell that reconstructs also resumes from its journal, eda.journal; the handoff saves the rest.)

The handed-over file is one Parquet file: the row, with the sample grid and the log in its metadata. An actor keeps
only its latest handoff, the one a re-queued attempt may still ask for; an attempt that takes a handoff removes it;
handoffs of other runs older than KEEP_S are removed when a run starts using the cache.
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

KEEP_S = 24 * 3600
DIR = "handoff"


def path_for(cache_dir: str | Path, run_id: str, key: str) -> Path:
    return Path(cache_dir) / DIR / run_id / f"{key}.parquet"


def save(path: Path, result: dict) -> None:
    """Write `result` ({"row", "png", "log", "load_error"}) atomically; a failure to write only costs the handoff."""
    from bench.harness.storage import write_atomic
    from bench.harness.store import SCHEMA, _table

    meta = {b"log": (result.get("log") or "").encode(), b"load_error": b"1" if result.get("load_error") else b"0"}
    if result.get("png"):
        meta[b"png"] = base64.b64encode(result["png"])
    table = _table([result["row"]], SCHEMA).replace_schema_metadata(meta)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def take(path: Path) -> dict | None:
    """The result handed over at `path`, removed from the cache; None when there is none (or it is unreadable)."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    finally:
        path.unlink(missing_ok=True)
    meta = table.schema.metadata or {}
    row = table.to_pylist()[0]
    return {"row": row, "png": base64.b64decode(meta[b"png"]) if b"png" in meta else None,
            "log": meta.get(b"log", b"").decode(), "load_error": meta.get(b"load_error") == b"1"}


def prune(cache_dir: str | Path, run_id: str, now: float | None = None) -> None:
    """Remove the handoffs of other runs last touched more than KEEP_S ago (a concurrent run keeps its own)."""
    root = Path(cache_dir) / DIR
    if not root.is_dir():
        return
    now = time.time() if now is None else now
    for d in root.iterdir():
        try:
            if d.name != run_id and now - d.stat().st_mtime > KEEP_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue
