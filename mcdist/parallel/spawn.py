"""Run a function on N local processes with an initialised process group (mcdist.runners.spawned, tests, benchmarks)."""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import wait as wait_for_exit
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcdist.parallel.mesh import init_distributed

PR_SET_PDEATHSIG = 1  # linux/prctl.h
ORPHAN_EXIT_CODE = 70  # how a rank whose driver died ends (the watchdog's exit)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that nothing listens on (a Ray head's ports, which ``ray start``
    takes as numbers; a rendezvous needs none: :func:`rendezvous_store`). Every probe socket stays bound until all
    are: probing one at a time and closing each lets the kernel hand the same port out twice (a CI run got one port
    for two of a Ray head's components)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """End this process when ``parent_pid`` (the driver that started it) dies, however it dies (a SIGKILL
    included): a rank without its driver must not train on and write a final model nobody waits for.

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``, replacing the SIGINT
    torch arms, which a process started with SIGINT ignored, a shell's background job, never acts on; the
    kernel ties it to the thread that started the process, here the one that waits for it); everywhere, a daemon
    thread also checks every ``poll_s`` seconds that this process's parent is still ``parent_pid`` (an orphan is
    re-parented) and exits otherwise. A parent already gone when this is called ends the process at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this libc: the watchdog below still ends the process
            pass
    if os.getppid() != parent_pid:  # the driver died before the signal was armed
        os._exit(ORPHAN_EXIT_CODE)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="mcdist-parent-watchdog", daemon=True).start()


def rendezvous_store(timeout_s: float):
    """A TCPStore on 127.0.0.1 that the caller holds (``.port``: the port the kernel gave it, bound and listening
    from the start): the rendezvous of one :func:`spawn`. A port probed free and then closed can be taken by
    another process before a rank binds it (two jobs, or two test workers, spawning at once), and a rank that
    found it taken would join the other job's store; a store bound once, and only joined, cannot be."""
    return dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def join_rendezvous(port: int, world_size: int, timeout_s: float):
    """One rank's client of the :func:`rendezvous_store` on ``port`` (for ``init_distributed(store=...)``)."""
    return dist.TCPStore("127.0.0.1", port, world_size, False, datetime.timedelta(seconds=timeout_s))


def _entry(rank, fn, world_size, port, backend, collective_timeout_s, threads, parent_pid, args):
    die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    init_distributed(backend, timeout_s=collective_timeout_s, rank=rank, world_size=world_size,
                     store=join_rendezvous(port, world_size, collective_timeout_s))
    try:
        fn(rank, world_size, *args)
        _leave_together(world_size, collective_timeout_s)
    finally:
        dist.destroy_process_group()


def _leave_together(world_size: int, timeout_s: float) -> None:
    """Wait (through the rendezvous store, not a collective) until every rank's function has returned, before any
    rank tears its transport down: a gloo process that destroys its group while a peer still works on it can
    abort in C++ ("terminate called without an active exception"). A store barrier does not pair up with a
    collective a failed peer left half-done (``dist.barrier`` would). The store is the driver's
    (:func:`rendezvous_store`), so no rank has to leave last to keep it up for the others. Best effort: any store
    error, or ``timeout_s``, just lets the rank go on."""
    try:
        store = dist.distributed_c10d._get_default_store()

        store.add("mcdist/spawn/returned", 1)
        deadline = time.monotonic() + timeout_s
        while store.add("mcdist/spawn/returned", 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.005)
    except Exception:  # a private API or a store that went away: leave as before
        return


# after one rank fails, how long the others may take to end by themselves before they are terminated: a rank that
# fails on its own cause (and writes its report) at the moment a peer reports "another rank failed" must not be
# killed before its report is written, or the caller would see the peer's echo instead of the cause
FAILURE_GRACE_S = 5.0


def _join(context, deadline: float) -> bool:
    """``context.join`` (True when every process ended well; raises the first failure, terminating the rest),
    after letting the others end by themselves for up to FAILURE_GRACE_S once one has failed."""
    running = [process.sentinel for process in context.processes if process.exitcode is None]
    if running:
        wait_for_exit(running, timeout=0.5)
    codes = [process.exitcode for process in context.processes]
    if not any(code not in (None, 0) for code in codes):
        # nothing failed (yet): ``context.join`` only once all ended, for a failure it saw first (one that happened
        # after the line above) it would terminate the others at once, with no grace (a rank's report was lost so)
        return None not in codes and context.join(timeout=0.01)
    grace_end = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    alive = [process for process in context.processes if process.exitcode is None]
    while alive and time.monotonic() < grace_end:
        wait_for_exit([process.sentinel for process in alive], timeout=0.1)
        alive = [process for process in alive if process.exitcode is None]
    return context.join(timeout=0.01)


def spawn(fn: Callable, world_size: int, *args, timeout_s: float = 300.0, backend: str = "gloo",
          collective_timeout_s: float = 60.0, threads_per_rank: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes joined in one process group.

    ``fn`` must be importable (a module-level function). Raises the first failure with its rank, or
    TimeoutError (after terminating every process) when the whole run exceeds ``timeout_s``: never hangs.
    The processes end when this one dies, even by SIGKILL (:func:`die_with_parent`). Their rendezvous is a store
    this process holds from before they start to after they end (:func:`rendezvous_store`): no port is probed.
    """
    store = rendezvous_store(collective_timeout_s)  # held (a local) until the processes have ended
    context = mp.start_processes(_entry, args=(fn, world_size, store.port, backend, collective_timeout_s,
                                               threads_per_rank, os.getpid(), args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    # torch warns "Terminating process N via signal SIGTERM" for each peer of a failed rank it stops: the
    # failure itself is raised (and reported as one line by the CLI), so the line is noise
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    while not _join(context, deadline):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(5)
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"distributed run of {getattr(fn, '__name__', fn)} on {world_size} processes did not "
                               f"finish within {timeout_s} s; every process was terminated")
