"""A fork-started multi-process harness for context-parallel tests on the CPU (gloo).

The parent imports torch / diffusers / lvsa once (and may build models); each case forks
``world`` workers that join a gloo group over a ``TCPStore`` on 127.0.0.1, run
``fn(rank, world, *args)`` and send back its result, what the rank printed on stderr,
and any error. Forking reuses everything the parent built, so a case costs a fraction of
a second instead of a fresh interpreter per rank.

>>> results = run_ranks(my_case, 2, timeout=30)        # doctest: +SKIP
>>> results[0].value, results[1].stderr, results[1].error
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: Optional[str] = None      # "Type: message" of what the rank raised
    traceback: str = ""
    stderr: str = ""
    finished: bool = True            # False: the rank was still running at the deadline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(b: bytes):
    import torch

    return torch.load(io.BytesIO(b), weights_only=False)


def _worker(rank, world, port, fn, args, env, queue, dist_timeout):
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    captured = io.StringIO()
    sys.stderr = captured
    payload: Dict[str, Any] = {"rank": rank}
    try:
        from lvsa import parallel  # (lvsa's config is cached per LVSA_* environment: env above is seen)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=(rank == 0),
                              timeout=datetime.timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=dist_timeout))
        try:
            payload["value"] = fn(rank, world, *args)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            parallel.report_failure(e)
            payload["error"] = f"{type(e).__name__}: {e}"
            payload["traceback"] = traceback.format_exc()
        finally:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    except BaseException as e:  # noqa: BLE001 - setup failed
        payload["error"] = f"{type(e).__name__}: {e}"
        payload["traceback"] = traceback.format_exc()
    payload["stderr"] = captured.getvalue()
    try:  # torch.save bytes: torch's shared-memory pickler needs the sender alive, and it exits

        queue.put(_to_bytes(payload))
    except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result
        queue.put(_to_bytes({"rank": rank, "error": f"result not transferable: {e}",
                             "stderr": captured.getvalue()}))
    sys.stderr = sys.__stderr__
    os._exit(0)  # no atexit handlers of the parent's copy (pytest, threads)


def run_ranks(fn: Callable, world: int, *args, timeout: float = 60.0, env: Optional[Dict[str, str]] = None,
              dist_timeout: float = 30.0) -> List[RankResult]:
    """Run ``fn(rank, world, *args)`` in ``world`` forked gloo ranks; results by rank.

    Ranks still running ``timeout`` seconds after the start are killed and come back with
    ``finished=False`` (a hang is a result, not a stuck test run).
    """
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    env = dict(env or {})
    env.setdefault("LVSA_DIST_TIMEOUT", str(dist_timeout))
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, env, queue, dist_timeout),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: Dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    reader = queue._reader  # SimpleQueue: poll the pipe so the deadline holds
    while len(results) < world and time.monotonic() < deadline:
        if reader.poll(0.05):
            d = _from_bytes(queue.get())
            results[d["rank"]] = RankResult(d["rank"], d.get("value"), d.get("error"), d.get("traceback", ""),
                                            d.get("stderr", ""))
    for p in procs:
        p.join(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join()
    return [results.get(r, RankResult(r, finished=False, error="did not finish before the harness deadline"))
            for r in range(world)]


__all__ = ["RankResult", "run_ranks", "free_port"]
