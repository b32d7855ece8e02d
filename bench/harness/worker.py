"""Ray execution: one `CellWorker` actor per GPU (or GPU fraction) or per CPU slot, each holding one loaded FP
model, fed by a driver loop that prefers giving an actor cells of the model it already holds.

Fault tolerance: the actor restarts itself after a crash (max_restarts); calls are never retried
by Ray (max_task_retries=0) because the call that killed an actor usually kills it again, so the driver re-queues the
cell itself, at most `retries` times, then records it as failed. A cell that raises inside the actor is caught there
and returned as a failed row. The driver is the only writer of the store (one Parquet file per cell, as results
arrive), so a crash loses at most the cells in flight, and workers on other nodes need no shared filesystem.
A worker the driver lost contact with (ActorUnavailableError) may still finish its cell after the driver re-queued
it: the finished result waits in the cache for the re-queued attempt (bench.harness.handoff).
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import resource
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray

from bench.harness.grid import Cell

MAX_RESTARTS = 3  # per actor; after that the driver replaces the actor (bounded by MAX_REPLACEMENTS)
MAX_REPLACEMENTS = 4
UNPLACEABLE_WAIT_S = 300  # how long cells that no live actor may run wait for a replacement actor to answer


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0)
class CellWorker:
    """Holds one FP model (loaded on first use) and runs cells of it."""

    def __init__(self, threads: int, imports: list[str]):
        import torch

        # Ray sets OMP_NUM_THREADS to num_cpus but a reused worker may keep 1 thread: set it explicitly.
        torch.set_num_threads(max(int(threads), 1))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for mod in imports:
            importlib.import_module(mod)
        self.cache = None
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.model_name, self.model = None, None
        self.run_id, self.last_handoff = None, None  # bench.harness.handoff

    def where(self) -> str:
        """The Ray node this actor runs on (a restarted actor may have moved): the dispatcher gives an actor only
        cells whose model and reference data its node has."""
        return ray.get_runtime_context().get_node_id()

    def run(self, cell_dict: dict, requests: list, context: dict, cache_root: str, sink=None) -> dict:
        """Run one cell; its log lines go to the returned "log", and also, as they happen, to `sink` (a LogSink)."""
        from bench.harness.artifacts import ArtifactCache

        if self.cache is None or self.cache.uri != str(cache_root):
            self.cache = ArtifactCache(cache_root)

        cell = Cell.from_dict(cell_dict)
        kept = self._handoff(cell, context)
        buf = io.StringIO()
        with cell_logging(f"bench.harness.cell.{os.getpid()}", buf, sink, cell.label()) as log:
            if kept is not None:
                log.info("cell %s (%s): the result of an earlier attempt in this run, which finished after the "
                         "driver had lost contact with its worker, is handed over instead of running the cell again",
                         cell.label(), cell.key)
                return {**kept, "log": kept["log"] + buf.getvalue()}
            row, png, load_error = self._run(cell, requests, context, log)
        result = {"row": row, "png": png, "log": buf.getvalue(), "load_error": load_error}
        self._keep(cell, context, result)
        return result

    def _handoff(self, cell: Cell, context: dict) -> dict | None:
        """The result an earlier attempt of this cell in this run left in the cache (bench.harness.handoff), if any."""
        from bench.harness import handoff

        run_id = context.get("run_id")
        if not run_id:
            return None
        if run_id != self.run_id:
            self.run_id = run_id
            handoff.prune(self.cache.root, run_id)
        return handoff.take(handoff.path_for(self.cache.root, run_id, cell.key))

    def _keep(self, cell: Cell, context: dict, result: dict) -> None:
        """Leave this result where a re-queued attempt finds it; only the latest one is kept."""
        from bench.harness import handoff

        if not context.get("run_id"):
            return
        path = handoff.path_for(self.cache.root, context["run_id"], cell.key)
        try:
            handoff.save(path, result)
        except Exception as e:  # noqa: BLE001 - the handoff is a saving, never a reason to lose the result itself
            logging.getLogger(__name__).warning("could not keep the result of %s for a re-queued attempt: %s",
                                                cell.label(), e)
            return
        if self.last_handoff is not None and self.last_handoff != path:
            self.last_handoff.unlink(missing_ok=True)
        self.last_handoff = path

    def _run(self, cell: Cell, requests: list, context: dict, log: logging.Logger) -> tuple[dict, bytes | None, bool]:
        from bench.harness.cell import failed_row, format_error, format_traceback, is_out_of_memory, run_cell
        from bench.harness.provenance import node_info

        log.info("cell %s (%s) on pid %d, device %s", cell.label(), cell.key, os.getpid(), self.device)
        t0, load_error, png, oom = time.time(), False, None, False
        cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        try:
            if self.model_name != cell.model:
                load_error = True
                self._load(cell.model)
                load_error = False
            row, png = run_cell(self.model, cell, self.cache, [tuple(r) for r in requests], context,
                                device=self.device, log=log)
        except Exception as e:  # noqa: BLE001 - any failure of one cell is recorded and the grid goes on
            log.error("%s", format_traceback(e))
            row = failed_row(cell, context, format_error(e), seconds=time.time() - t0)
            oom = is_out_of_memory(e)
        row.update(node_info(self.device))  # here, not in the driver: the node and GPU this cell ran on
        if oom:  # out of the except block: the traceback, and the tensors its frames held, are gone now
            self._release_memory()
        cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
        # CPU seconds as well as wall seconds: on a shared machine wall time says little about a dedicated one
        log.info("status %s in %.1fs wall, %.1fs CPU; cache hits %s", row["status"], time.time() - t0, cpu,
                 self.cache.hits)
        return row, png, load_error

    def _release_memory(self):
        """After an out-of-memory cell: give the freed blocks back so the next cell starts from the model alone."""
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _load(self, name: str):
        import torch

        from bench.models.registry import load_model

        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.model = load_model(name, device=self.device)
        self.model_name = name


# Libraries whose INFO lines are a cell's progress (bench.models.sampling: "sampling batch k/n", eda.recon:
# "reconstruction unit i/m"). Silent outside a cell (no handler, WARNING level); a cell's log takes them in.
PROGRESS_LOGGERS = ("eda", "bench.models")
PROGRESS_INTERVAL = 1.0  # seconds: at most one live progress line per library per second (a cell's own lines: all)


@ray.remote(num_cpus=0)  # takes no CPU slot: it must never keep a CellWorker from starting
class LogSink:
    """Where workers push log lines while their cells run; the driver drains it about once a second. Pushes are
    fire-and-forget actor calls, which Ray delivers in order per worker."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def push(self, label: str, line: str) -> None:
        self.lines.append((label, line))

    def drain(self) -> list[tuple[str, str]]:
        out, self.lines = self.lines, []
        return out


class SinkHandler(logging.Handler):
    """Forwards a cell's log records to a LogSink, labelled with the cell; library progress lines rate-limited."""

    def __init__(self, sink, label: str):
        super().__init__()
        self.sink, self.label, self.last, self.pending = sink, label, {}, None
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(PROGRESS_LOGGERS):
            lib = record.name.split(".")[0]
            if record.created - self.last.get(lib, 0.0) < PROGRESS_INTERVAL:
                return
            self.last[lib] = record.created
        try:
            self.pending = self.sink.push.remote(self.label, self.format(record))
        except Exception:  # noqa: BLE001 - live lines are a convenience: never fail a cell over one
            pass

    def flush(self) -> None:
        """Wait (briefly) until the sink holds every line pushed so far: Ray runs one caller's calls in order, so
        the last one done means all are, and the driver, which drains before collecting results, gets a cell's
        lines before its end."""
        if self.pending is not None:
            ray.wait([self.pending], timeout=5.0)
            self.pending = None


@contextmanager
def cell_logging(name: str, buf: io.StringIO, sink, label: str):
    """A logger for one cell writing to `buf` (the cell's log file) and, with a sink, live to the driver; the
    progress libraries' INFO lines go to both while the cell runs, and are silenced again after it."""
    handlers: list[logging.Handler] = [logging.StreamHandler(buf)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    if sink is not None:
        handlers.append(SinkHandler(sink, label))
    log = logging.getLogger(name)
    log.handlers[:] = handlers
    log.setLevel(logging.INFO)
    log.propagate = False
    libs = [logging.getLogger(n) for n in PROGRESS_LOGGERS]
    saved = [(lg.level, lg.propagate) for lg in libs]
    for lg in libs:
        for h in handlers:
            lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        yield log
    finally:
        for h in handlers:
            h.flush()
        for lg, (level, propagate) in zip(libs, saved):
            for h in handlers:
                lg.removeHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate
        log.handlers[:] = []


@dataclass
class Slot:
    actor: object
    model: str | None = None
    busy: bool = False
    replacements: int = 0
    node: str | None = None  # the actor's Ray node, once it answered `where`


@dataclass
class Pending:
    by_model: dict[str, deque] = field(default_factory=dict)

    def push(self, cell: Cell, front: bool = False):
        q = self.by_model.setdefault(cell.model, deque())
        q.appendleft(cell) if front else q.append(cell)

    def take(self, held: str | None, held_by_others: set[str], fits=None) -> Cell | None:
        """Prefer the model this actor holds; else a model nobody holds (most cells first); else any. `fits(cell)`,
        when given, says which cells this actor may run at all (its node has their model and data)."""
        live = {m: [c for c in q if fits is None or fits(c)] for m, q in self.by_model.items()}
        live = {m: cs for m, cs in live.items() if cs}
        if not live:
            return None
        if held in live:
            m = held
        else:
            free = [m for m in live if m not in held_by_others] or list(live)
            m = max(free, key=lambda k: len(live[k]))
        cell = live[m][0]
        self.by_model[m].remove(cell)
        return cell

    def drain(self, model: str) -> list[Cell]:
        q = self.by_model.get(model, deque())
        out = list(q)
        q.clear()
        return out

    def __len__(self):
        return sum(len(q) for q in self.by_model.values())


_KEPT: dict = {}  # actors kept alive between execute() calls of one driver (keep_actors=True), by their options


def crash_message(times: int, e: Exception) -> str:
    """The failed row of a cell whose worker process died (no Python error to report). The commonest cause is
    memory: the kernel's OOM killer sends SIGKILL, and Ray's memory monitor kills the biggest worker first."""
    text = str(e)
    if "low on memory" in text or "memory monitor" in text:
        cause = "killed for memory by Ray's memory monitor"
    else:
        cause = "the process died without a Python error, most often the OS out-of-memory killer (check dmesg)"
    return (f"worker crashed {times} times running this cell ({type(e).__name__}: {cause}); lower batch_size in "
            f"the grid or run fewer workers (--max-workers), and see the Ray worker logs")


def _actors(n: int, key: tuple, new_actor) -> list[Slot]:
    """n idle actors: reuse the kept ones if they were made with the same options, else start new ones."""
    kept = _KEPT.pop(key, [])
    for other in _KEPT.values():  # actors with other options would hold the CPUs/GPUs these need
        for slot in other:
            ray.kill(slot.actor)
    _KEPT.clear()
    for slot in kept[n:]:
        ray.kill(slot.actor)
    return kept[:n] + [Slot(new_actor()) for _ in range(n - len(kept[:n]))]


def execute(cells: list[Cell], requests: dict, context: dict, on_result, *, num_workers: int, cpus_per_worker: float,
            gpus_per_worker: float, imports: list[str], cache_root: str, retries: int = 1, progress=None,
            keep_actors: bool = False, on_log=None, memory_per_worker: int | None = None,
            placement: dict | None = None) -> dict:
    """Run cells on Ray actors; `on_result(cell, result_dict, attempts)` is called as each cell finishes, and
    `on_log(label, line)`, if given, with each log line of a running cell about a second after the worker wrote it.
    `placement[(model, metrics)]`, when given (a probed cluster, bench.harness.probe.placement), is the set of node
    ids a cell of that model and metrics may run on; cells whose nodes have all left are recorded as failed.

    `requests[(model, sampler_json, seed)]` lists the (method, overrides) of every cell of the grid on that model, so
    the shared trajectories cover all methods. Returns counts {"ok", "failed", "crashes", "lost" (cells re-queued
    because the driver lost contact with their worker), "replaced"}.
    """
    threads = max(int(cpus_per_worker), 1)

    # memory: Ray reserves it for scheduling (an actor waits for a node with that much free); None reserves nothing
    mem = {"memory": int(memory_per_worker)} if memory_per_worker else {}

    def new_actor():
        return CellWorker.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, **mem).remote(threads, imports)

    akey = (ray.get_runtime_context().get_job_id(), cpus_per_worker, gpus_per_worker, memory_per_worker,
            tuple(imports))
    slots = _actors(max(min(num_workers, len(cells)), 1), akey, new_actor) if cells else []
    d = Dispatcher(slots, new_actor, requests, context, cache_root, on_result, retries, progress, placement)
    sink = LogSink.remote() if on_log and cells else None
    d.sink, d.on_log = sink, on_log
    try:
        d.run(cells)
    finally:
        if sink is not None:
            d.drain_logs()  # the last lines of the last cells
            ray.kill(sink)  # also when a slow drain made the dispatcher give up on it
        if keep_actors and not d.inflight:  # the caller owns the cluster (tests, notebooks): reuse warm actors
            _KEPT[akey] = slots
        else:
            for slot in slots:
                ray.kill(slot.actor)
    return d.stats


class Dispatcher:
    """The driver loop: give idle actors work, collect results as they arrive, re-queue cells of crashed actors."""

    def __init__(self, slots, new_actor, requests, context, cache_root, on_result, retries, progress,
                 placement: dict | None = None):
        self.slots, self.new_actor, self.requests, self.context = slots, new_actor, requests, context
        self.cache_root, self.on_result, self.retries, self.progress = cache_root, on_result, retries, progress
        self.placement = placement
        self.pending = Pending()
        self.inflight: dict = {}  # ref -> (slot, cell, or None for a `where` call that waits for the actor's node)
        self.idle_since: float | None = None  # since when cells wait that no live actor may run
        self.attempts: dict[str, int] = {}
        self.stats = {"ok": 0, "failed": 0, "crashes": 0, "lost": 0, "replaced": 0}
        self.sink, self.on_log = None, None  # LogSink and its callback (execute sets them)

    def drain_logs(self) -> None:
        """Hand the lines workers pushed since the last call to on_log. A lost sink only ends the live lines (the
        cells' logs still reach the store)."""
        if self.sink is None:
            return
        try:
            lines = ray.get(self.sink.drain.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):
            self.sink = None
            return
        for label, line in lines:
            self.on_log(label, line)

    def run(self, cells: list[Cell]) -> None:
        for c in cells:
            self.pending.push(c)
        if self.placement is not None:  # each actor first says which node it is on
            for slot in self.slots:
                self._locate(slot)
        while len(self.pending) or any(cell is not None for _, cell in self.inflight.values()):
            # Only `where` calls left in flight and nothing to run: done. A replacement actor for a lost node may
            # never be scheduled (the surviving nodes' slots are taken), and waiting for its answer would never end.
            self._submit()
            if self._unplaceable():
                continue
            if not self.inflight:
                continue
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            self.drain_logs()  # before the results: a cell's lines come before its end
            if self.progress:
                self.progress.tick()
            for ref in ready:
                self._collect(ref)

    def _fits(self, slot: Slot):
        if self.placement is None:
            return None
        return lambda cell: slot.node in self.placement.get((cell.model, cell.metrics), (slot.node,))

    def _locate(self, slot: Slot) -> None:
        """Ask the actor (new, restarted or replaced) for its node; it gets work once it answers."""
        self.inflight[slot.actor.where.remote()] = (slot, None)
        slot.busy = True

    def _unplaceable(self) -> bool:
        """Cells wait that no actor may run (placement): their nodes left the cluster. Fail them once no cell is
        running and no actor has been waiting to answer for UNPLACEABLE_WAIT_S (a replacement may still land on
        a suitable node). True when it failed some."""
        running = any(cell is not None for _, cell in self.inflight.values())
        if self.placement is None or not len(self.pending) or running:
            self.idle_since = None
            return False
        locating = any(cell is None for _, cell in self.inflight.values())
        self.idle_since = self.idle_since or time.time()
        if locating and time.time() - self.idle_since < UNPLACEABLE_WAIT_S:
            return False
        for model in list(self.pending.by_model):
            for cell in self.pending.drain(model):
                self._fail_without_running(cell, f"no live node of the cluster has model {cell.model} and the "
                                           "reference data of its metrics (the nodes that had them left); rerun "
                                           "the grid once such a node is back", 0)
        return True

    def _submit(self) -> None:
        held_by = {s.model for s in self.slots if s.model}
        for slot in self.slots:
            if slot.busy:
                continue
            cell = self.pending.take(slot.model, held_by - {slot.model}, self._fits(slot))
            if cell is None:
                continue
            rkey = (cell.model, _sampler_key(cell.sampler), cell.seed)
            ref = slot.actor.run.remote(cell.to_dict(), self.requests.get(rkey, []), self.context, self.cache_root,
                                        self.sink)
            self.inflight[ref] = (slot, cell)
            slot.busy, slot.model = True, cell.model
            held_by.add(cell.model)
            if self.progress:
                self.progress.started()

    def _collect(self, ref) -> None:
        slot, cell = self.inflight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._crashed(slot, cell, e)
            return
        slot.busy = False
        if cell is None:  # `where` came back: the (restarted) actor is ready for work, on this node
            slot.node = result
            return
        self._finish(cell, result, self.attempts.get(cell.key, 1))
        if result.get("load_error"):
            # the model cannot be loaded here (offline, missing weights): fail its other cells now, not one by one
            slot.model = None
            for other in self.pending.drain(cell.model):
                self._fail_without_running(other, result["row"]["error"], 0)

    def _crashed(self, slot: Slot, cell: Cell | None, e: Exception) -> None:
        """The actor died mid-call. Ray restarts it (max_restarts); once restarts run out, replace it (bounded).
        The cell is re-queued until it has crashed `retries + 1` times, then recorded as failed."""
        lost = isinstance(e, ray.exceptions.ActorUnavailableError)  # unreachable for a while, not dead
        self.stats["lost" if lost else "crashes"] += int(cell is not None)
        slot.model = None
        if isinstance(e, ray.exceptions.ActorDiedError) and not isinstance(e, ray.exceptions.ActorUnavailableError):
            if slot.replacements >= MAX_REPLACEMENTS:
                raise RuntimeError(f"a Ray worker died {MAX_REPLACEMENTS} times over; giving up ({e})") from None
            slot.actor = self.new_actor()
            slot.replacements += 1
            self.stats["replaced"] += 1
        if cell is not None:
            n = self.attempts[cell.key] = self.attempts.get(cell.key, 1) + 1
            if self.progress:
                self.progress.requeued()
            if n > self.retries + 1:
                self._fail_without_running(cell, crash_message(n - 1, e), n - 1)
            else:
                self.pending.push(cell, front=True)
        # give the restarted (or replaced) actor work only once it answers, and says where it now runs
        self._locate(slot)

    def _finish(self, cell: Cell, result: dict, attempts: int) -> None:
        ok = result["row"]["status"] == "ok"
        self.stats["ok" if ok else "failed"] += 1
        self.on_result(cell, result, attempts)
        if self.progress:
            self.progress.finished(ok, cell.label(), result["row"]["error"])

    def _fail_without_running(self, cell: Cell, error: str, attempts: int) -> None:
        from bench.harness.cell import failed_row

        if self.progress:
            self.progress.started()
        self._finish(cell, {"row": failed_row(cell, self.context, error, attempts=attempts), "png": None,
                            "log": error + "\n", "load_error": False}, attempts)


def _sampler_key(sampler) -> str:
    import json

    return json.dumps(sampler, sort_keys=True)


def write_result(out: Path, cell: Cell, result: dict, attempts: int, storage: str | None = None) -> Path | str:
    """Store one finished cell: its Parquet row and PNG sample grid under `storage` (a folder or URI; default
    `out`), its log under `out`/logs (the driver is the only writer). The row goes last: a cell is in the store only
    once its PNG and log are. Disk full: one-line BenchError."""
    from bench.harness.store import partition_parts, runs_dir, write_atomic, write_row, write_store_file

    root = runs_dir(storage or out)
    row = dict(result["row"])
    row["attempts"] = attempts
    if result.get("png"):
        parts = [*partition_parts(cell.grid, cell.model, cell.method), "_samples",
                 f"{cell.bits}-seed{cell.seed}-{cell.key}.png"]
        write_store_file(root, parts, result["png"])
        row["sample_grid"] = "/".join(parts)  # relative to the store root
    log = Path(out) / "logs" / cell.grid / cell.model / cell.method.replace(":", "_") / \
        f"{cell.bits}-seed{cell.seed}-{cell.key}.log"
    write_atomic(log, lambda tmp: tmp.write_text(result.get("log", "")))
    return write_row(root, row)
