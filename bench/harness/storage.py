"""Storage every node can reach, for the results dataset and the FP artifact cache (`bench.run --storage URI`).

A URI is resolved with pyarrow.fs (`FileSystem.from_uri`): a plain path or `file://` (a local disk, or NFS / any
shared POSIX mount), `s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://...`; other schemes go through fsspec when
it knows them (`memory://`, `az://` with adlfs installed, ...). Two kinds follow from the filesystem:

  posix   a local or mounted path. Writes go to a dot-named temp file beside the target, are fsynced and renamed
          (atomic within a directory, NFS included). Locks are lock files created with O_CREAT | O_EXCL, which is
          atomic on local filesystems and on NFSv3 and later, unlike flock, which NFS clients may not honour.
  object  an object store. An object appears whole or not at all when its upload completes (single PUT or
          completed multipart upload), so writes go straight to the final key; there is no rename. Locks are lease
          objects: write a token, wait SETTLE_S, read it back, and hold the lease only if the token is still ours
          (S3, GCS and Azure read-after-write consistency makes the later writer win for both readers).

Both kinds of lock are refreshed by a heartbeat while held, and a lock not refreshed for STALE_S is taken over (its
holder died with it held). Nothing here calls flock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError, UsageError

TEMP_PREFIX = ".tmp-"  # in-progress writes (Parquet rows, sample-grid PNGs); dataset discovery skips dotfiles
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
STALE_S = 120.0  # a lock whose heartbeat stopped this long ago belongs to a dead holder
BEAT_S = 10.0  # how often a held lock is refreshed
SETTLE_S = 2.0  # object stores: how long a lease token must survive before its writer holds the lease
POLL_S = 0.5


def disk_full_error(path: str | os.PathLike, e: OSError) -> BenchError:
    """The one line for a write that ran out of space (or quota): every finished cell is already stored, so freeing
    space and rerunning the same command resumes where it stopped."""
    return BenchError(f"disk full while writing {path} ({os.strerror(e.errno)}); free space or pass --out elsewhere, then "
                      "rerun the same command: finished cells are kept and skipped")


def write_atomic(final: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to a dotfile temp beside `final`, fsync, then rename: readers see the whole file or none. A write
    that fails removes its temp (disk full: one-line BenchError); a SIGKILLed writer's temp is reclaimed later by
    remove_stale_temps."""
    tmp = final.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}{final.suffix}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(final, e) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


@dataclass
class Storage:
    """A pyarrow filesystem and a base path in it. `posix` selects the write and lock protocol (module docstring)."""

    fs: object
    base: str
    posix: bool
    uri: str

    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *[str(p).strip("/") for p in parts if str(p)]])

    def local_path(self, *parts: str) -> Path:
        """The path on this machine (posix storage only)."""
        assert self.posix, "an object store has no local path"
        return Path(self.path(*parts))

    def is_file(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type == pafs.FileType.File

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically: readers see all of `data` at `path` or nothing (module docstring)."""
        if self.posix:
            write_atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))
            return
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def upload(self, local: Path, path: str) -> None:
        if self.posix:
            write_atomic(Path(path), lambda tmp: Path(tmp).write_bytes(Path(local).read_bytes()))
            return
        import pyarrow.fs as pafs

        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download(self, path: str, local: Path) -> None:
        """Copy one file here, atomically (a temp beside `local`, then rename)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with self.fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            os.replace(tmp, local)
        finally:
            if tmp.exists():
                tmp.unlink()

    def list_files(self, path: str) -> list[str]:
        """Paths of the files directly in folder `path` ([] when it does not exist)."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
        return sorted(i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:  # already gone
            pass

    @contextmanager
    def lock(self, path: str, stale_s: float = STALE_S, beat_s: float = BEAT_S, settle_s: float = SETTLE_S):
        """Hold the lock named `path` (a file or object that exists while it is held) for the `with` body."""
        token = json.dumps({"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()})
        acquire = self._acquire_posix if self.posix else self._acquire_object
        acquire(path, token, stale_s, settle_s)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(path, token, beat_s, stop), daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            if self._holder(path) == token:
                self.delete(path)

    def _holder(self, path: str) -> str | None:
        try:
            return self.read_bytes(path).decode()
        except (OSError, UnicodeDecodeError):
            return None

    def _age(self, path: str) -> float | None:
        """Seconds since the lock was last written (None when it does not exist)."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        return time.time() - mtime

    def _acquire_posix(self, path: str, token: str, stale_s: float, settle_s: float) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                age = self._age(path)
                if age is not None and age > stale_s:
                    # take over a dead holder's lock: of several waiters, exactly one rename succeeds
                    try:
                        os.replace(path, f"{path}.stale-{uuid.uuid4().hex}")
                    except FileNotFoundError:
                        pass
                    else:
                        for p in Path(path).parent.glob(Path(path).name + ".stale-*"):
                            p.unlink(missing_ok=True)
                    continue
                time.sleep(POLL_S)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(token)
                f.flush()
                os.fsync(f.fileno())
            return

    def _acquire_object(self, path: str, token: str, stale_s: float, settle_s: float) -> None:
        while True:
            age = self._age(path)
            if age is None or age > stale_s:
                self.write_bytes(path, token.encode())
                time.sleep(settle_s)  # a writer that saw the lease free at the same time wrote by now
                if self._holder(path) == token:
                    return
            time.sleep(POLL_S)

    def _heartbeat(self, path: str, token: str, beat_s: float, stop: threading.Event) -> None:
        while not stop.wait(beat_s):
            if self._holder(path) != token:
                return  # taken over (we were too slow to beat): nothing of ours to refresh
            if self.posix:
                os.utime(path)
            else:
                self.write_bytes(path, token.encode())


def open_storage(uri: str | os.PathLike) -> Storage:
    """A Storage for a path or URI (module docstring); one UsageError line when it cannot be opened."""
    import pyarrow.fs as pafs

    text = str(uri)
    if "://" not in text:  # a plain path, relative or absolute
        return Storage(pafs.LocalFileSystem(), str(Path(text).absolute()), True, text)
    try:
        fs, base = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        fs, base = _fsspec(text, e)
    posix = isinstance(fs, pafs.LocalFileSystem)
    return Storage(fs, base, posix, text)


def _fsspec(uri: str, why: Exception):
    """Schemes pyarrow does not know, through fsspec (when installed and it knows them)."""
    import pyarrow.fs as pafs

    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise UsageError(f"cannot open storage {uri!r} ({str(why).splitlines()[0]}); pyarrow knows file://, s3://, "
                         "gs:// and hdfs://; for other schemes install fsspec and its backend") from None
    try:
        fs, base = url_to_fs(uri)
    except (ValueError, ImportError, OSError) as e:
        raise UsageError(f"cannot open storage {uri!r}: {str(e).splitlines()[0][:200]} (fsspec "
                         f"{fsspec.__version__})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), base
