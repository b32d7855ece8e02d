"""Fault-injection methods for the harness tests (`imports = ["tests.fault_plugin"]` in a grid); builds on
tests/harness_plugin.py (the `test-tiny` model). Imported in the driver and in every Ray worker.

  test-wait  blocks until the file `release` exists (at most `wait_s` seconds), then behaves like test-ok: a cell
             that is still running when the test kills the driver
  test-oom       raises MemoryError, as a host allocation that does not fit would
  test-oom-cuda  raises torch.OutOfMemoryError with the CUDA caching allocator's (multi-line) message
  test-stall  pauses its own worker process (SIGSTOP) for `stall_s` seconds, once per `marker` file, then behaves
             like test-ok; every quantization appends a line to `count`: a node that stops answering for a while
             and then finishes its cell (with short gRPC keepalives the driver sees ActorUnavailableError)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from eda.registry import available_methods, register_method
from tests.harness_plugin import _Fake

if "test-wait" not in available_methods():

    @register_method("test-wait")
    @dataclass(frozen=True)
    class _Wait(_Fake):
        release: str = ""
        wait_s: float = 120.0

        def misbehave(self, m):
            t0 = time.time()
            while m.release and not os.path.exists(m.release) and time.time() - t0 < m.wait_s:
                time.sleep(0.1)

    @register_method("test-oom")
    @dataclass(frozen=True)
    class _Oom(_Fake):
        kind: str = "cpu"

        def misbehave(self, m):
            if m.kind == "cuda":
                # the message torch's CUDA caching allocator raises (several lines, shortened)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 79.15 GiB of which 1.06 GiB is free.\nIf reserved but "
                                             "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")
            raise MemoryError()

    @register_method("test-oom-cuda")
    @dataclass(frozen=True)
    class _OomCuda(_Oom):
        kind: str = "cuda"

if "test-stall" not in available_methods():

    @register_method("test-stall")
    @dataclass(frozen=True)
    class _Stall(_Fake):
        stall_s: float = 20.0
        count: str = ""

        def misbehave(self, m):
            import subprocess

            if m.count:
                with open(m.count, "a") as fh:
                    fh.write("quantized\n")
            if m.marker and not os.path.exists(m.marker):
                open(m.marker, "w").close()
                pid = os.getpid()
                # a detached helper stops this process and resumes it; the cell sleeps through the pause
                subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -STOP {pid}; sleep {m.stall_s}; kill -CONT {pid}"],
                                 start_new_session=True)
                time.sleep(1.0 + 1.0)
