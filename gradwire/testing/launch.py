"""Launch a function on several processes with a fresh file:// rendezvous, and collect results.

Process start plus ``import torch`` costs seconds, so tests batch many cases into one launch:
the worker function runs them all and returns a picklable dict. Each worker gets its own
process group (gloo by default) with a short timeout, so a dead peer surfaces as an error
rather than a hang; the parent kills the whole job after ``timeout_s`` regardless.
"""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch.multiprocessing as mp


@dataclass
class WorkerResult:
    rank: int
    exitcode: int | None  # None: killed by the parent's timeout
    value: Any = None  # what the function returned (None if it raised or exited early)
    error: str | None = None  # formatted traceback if it raised


def _entry(fn, rank, world, init_file, out_dir, backend, pg_timeout_s, args):
    import torch.distributed as dist

    out = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world, *args)
        res = {"value": value, "error": None}
    except BaseException:  # report everything, including assertion errors, to the parent
        res = {"value": None, "error": traceback.format_exc()}
    with open(out + ".tmp", "wb") as f:
        pickle.dump(res, f)
    os.replace(out + ".tmp", out)
    if res["error"] is None and dist.is_initialized():
        try:
            dist.barrier()  # DESIGN.md: barrier before destroy_process_group
        except Exception:
            pass
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown (gloo threads can make it slow)


def run_workers(fn: Callable, world_size: int, *args: Any, backend: str = "gloo",
                pg_timeout_s: float = 20.0, timeout_s: float = 180.0) -> list[WorkerResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be importable by module path (spawn pickles it by reference). Returns one
    ``WorkerResult`` per rank; raises ``TimeoutError`` if the job outlives ``timeout_s``.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gradwire-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, tmp, backend,
                                                  pg_timeout_s, args), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pkl")
            res = {"value": None, "error": None}
            if os.path.exists(path):
                with open(path, "rb") as f:
                    res = pickle.load(f)
            results.append(WorkerResult(r, None if r in hung else p.exitcode, res["value"], res["error"]))
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout_s}s; results: {results}")
        return results


def values(results: list[WorkerResult]) -> list[Any]:
    """The return values, raising with every rank's traceback if any rank failed."""
    errs = [f"rank {r.rank}:\n{r.error}" for r in results if r.error]
    if errs:
        raise AssertionError("worker(s) failed:\n" + "\n".join(errs))
    return [r.value for r in results]
