"""Resumable reconstruction: a journal of the units already reconstructed, so a quantization that is interrupted
(a preempted node, a killed process, Ctrl-C) continues from the next unit instead of from the first.

Reconstruction runs unit by unit in forward order (`eda.recon.reconstruct`), and once a unit is done its state is
fixed: rounding hardened, step sizes frozen. After each unit the journal writes that unit's quantizer tensors
(AdaRound alphas, weight and activation deltas, zero points, ranges; never the FP weights, which reconstruction
does not change) as safetensors, and its report (loss curve, MSE before/after, seconds) as JSON, each renamed into
place so a kill leaves either the whole entry or none. A rerun with the same fingerprint restores the journalled
units in order and reconstructs from the first one missing. Each unit seeds its own generators from (seed, unit
index) and collects its inputs from the model as restored, so on one machine a resumed quantization equals an
uninterrupted one exactly (tests/test_journal.py).

The fingerprint covers what the finished units depend on: the method and its knobs, bits, seed, every stage's
configuration, the calibration and range-initialisation sets, the FP UNet's weights, and a caller's `context`
(the harness and `bench.quantize` pass the git commit, so a journal never outlives the code that wrote it). A
journal with another fingerprint is discarded with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "journal.json"
# Above this many elements a tensor is hashed from a strided sample (a 1B-parameter UNet hashes in seconds, not
# minutes); smaller ones, calibration sets included, are hashed whole.
_FULL_HASH_MAX_NUMEL = 1 << 24


def tensor_digest(h, name: str, t: torch.Tensor | None) -> None:
    """Feed a tensor's name, shape, dtype and values into the hash `h`."""
    if t is None:
        h.update(f"{name}:none".encode())
        return
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    flat = t.detach().reshape(-1)
    if flat.numel() > _FULL_HASH_MAX_NUMEL:
        flat = flat[:: flat.numel() // _FULL_HASH_MAX_NUMEL + 1]
    h.update(flat.float().cpu().contiguous().numpy().tobytes())


def fingerprint(parts: dict[str, Any], tensors: dict[str, torch.Tensor | None]) -> str:
    """One hex digest of JSON-able identity `parts` and `tensors` (named)."""
    h = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        tensor_digest(h, name, tensors[name])
    return h.hexdigest()[:20]


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Entry:
    """One journalled unit: its quantizer tensors (names relative to the unit) and its report."""

    state: dict[str, torch.Tensor]
    report: dict


class Journal:
    """The folder of one quantization's journal. `open(fp)` binds it to a fingerprint (discarding entries written
    under another); `stage(name)` gives the per-stage view `reconstruct` reads and writes; `clear()` removes it once
    the quantized model is safe elsewhere."""

    def __init__(self, folder: str | os.PathLike, context: str = ""):
        self.folder = Path(folder)
        self.context = context
        self.fingerprint: str | None = None
        self.restored = 0  # units restored by every stage of this run

    def open(self, parts: dict[str, Any], tensors: dict[str, torch.Tensor | None]) -> Journal:
        fp = fingerprint({**parts, "context": self.context}, tensors)
        meta = self.folder / FINGERPRINT_FILE
        if meta.is_file():
            try:
                old = json.loads(meta.read_text()).get("fingerprint")
            except (OSError, ValueError):
                old = None
            if old != fp:
                log.info("journal %s was written for another quantization (code, model, data or knobs differ); "
                         "discarded, reconstructing from the first unit", self.folder)
                shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            _write_atomic(meta, json.dumps({"fingerprint": fp, "parts": {**parts, "context": self.context}},
                                           sort_keys=True, default=str, indent=1).encode())
        self.fingerprint = fp
        return self

    def stage(self, name: str) -> StageJournal:
        if self.fingerprint is None:
            raise RuntimeError("Journal.open(...) must be called before stage()")
        return StageJournal(self, self.folder / _safe(name))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "stage"


class StageJournal:
    """The entries of one reconstruction stage, by unit index."""

    def __init__(self, journal: Journal, folder: Path):
        self.journal = journal
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, idx: int) -> tuple[Path, Path]:
        return self.folder / f"{idx:04d}.safetensors", self.folder / f"{idx:04d}.json"

    def load(self, idx: int, unit: str) -> Entry | None:
        """The entry of unit `idx` if it was journalled whole for this unit name, else None."""
        from safetensors.torch import load_file

        tpath, jpath = self._paths(idx)
        if not jpath.is_file():  # the JSON is written last: without it the entry is incomplete
            return None
        try:
            meta = json.loads(jpath.read_text())
            if meta.get("unit") != unit:
                log.info("journal entry %d is for unit %s, not %s; reconstructing from here", idx, meta.get("unit"),
                         unit)
                return None
            state = load_file(str(tpath))
        except Exception as e:  # a truncated or corrupt entry: reconstruct the unit again
            log.info("journal entry %s unreadable (%s); reconstructing from unit %s", jpath, e, unit)
            return None
        return Entry(state, meta["report"])

    def save(self, idx: int, unit: str, state: dict[str, torch.Tensor], report: dict) -> None:
        from safetensors.torch import save

        tpath, jpath = self._paths(idx)
        # again here, not only in __init__: a Ray call reported lost (ActorUnavailableError) may still finish in
        # the background and clear the journal while the retried cell writes to it
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(tpath, save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}))
        _write_atomic(jpath, json.dumps({"unit": unit, "report": report}, default=str).encode())

    def truncate(self, idx: int) -> None:
        """Drop entries from unit `idx` on: they were reconstructed from a state this run no longer has."""
        for p in self.folder.iterdir():
            stem = p.name.split(".")[0]
            if stem.isdigit() and int(stem) >= idx:
                p.unlink(missing_ok=True)
