"""Multi-process runs: ``jax.distributed`` set-up and the barriers of the run engine.

Every process runs the same command with its own process id; the run folder (``--out``) is on a
file system that every process sees. Each process computes every ``process_count``-th batch
and writes its batch files; process 0 then merges all of them into the reports.

The barriers go through the ``jax.distributed`` coordination service, not through a device
collective: on CPU, ``multihost_utils.sync_global_devices`` is a Gloo all-gather whose set-up
times out when the processes arrive more than 30 s apart (measured with jax 0.10.2), and the
processes of a run finish their batches minutes or hours apart. A barrier here waits as long
as the work takes; a process that dies is detected by the service's heartbeat
(``--heartbeat_timeout``), which then stops every other process with an error instead of
leaving them waiting.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import pathlib
import socket
import time
from typing import Iterable

import jax
from jax._src import distributed as _distributed  # the coordination service client (no public handle)

__all__ = ["is_process_zero", "initialize", "barrier", "process_zero_first",
           "wait_until_visible", "require_visible", "BARRIER_TIMEOUT_S"]

log = logging.getLogger("la_iprop")

# How long a barrier waits for the slowest process: the work left to another process, not a failure
# detector (a dead process is detected by the heartbeat within --heartbeat_timeout).
BARRIER_TIMEOUT_S = 7 * 24 * 3600
_BARRIER_IDS = itertools.count()  # every process calls the barriers of a run in the same order


def is_process_zero() -> bool:
    """Whether this process writes what a run shares beyond its own batches (reports, results)."""
    return jax.process_index() == 0


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None, *,
               detect: bool = False, heartbeat_timeout: int = 100, initialization_timeout: int = 300) -> bool:
    """Initialises ``jax.distributed`` when any of the three settings is given or ``detect`` is set;
    returns whether it did. Settings not given are detected from the cluster by jax (Cloud TPU pods,
    SLURM, Open MPI). With all three given, detection is off: each process sees all its local devices
    (under SLURM or Open MPI on GPUs, jax's detection restricts a process to one device, the one of its
    local rank). Raises ValueError with a one-line reason when it cannot initialise."""
    given = (coordinator_address, num_processes, process_id)
    if not detect and all(v is None for v in given):
        return False
    explicit = all(v is not None for v in given)
    if explicit and 0 <= process_id < num_processes:
        initialization_timeout = _check_coordinator(coordinator_address, process_id, initialization_timeout)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   cluster_detection_method="deactivate" if explicit else None,
                                   initialization_timeout=initialization_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (ValueError, TypeError) as err:
        hint = "" if explicit else (" (not detected from the environment: give --coordinator_address, "
                                    "--num_processes and --process_id, or run under SLURM, Open MPI or on a TPU pod)")
        raise ValueError(f"{_first_line(err)}{hint}") from None
    except Exception as err:  # jax's runtime errors
        raise ValueError(f"could not join the run's processes through the coordinator at "
                         f"{coordinator_address or '(detected)'} within {initialization_timeout} s: "
                         f"{_first_line(err)}") from None
    log.info("process %d of %d (coordinator %s); if a process dies, the others stop within about %d s "
             "(--heartbeat_timeout): rerun the same command on every process to resume",
             jax.process_index(), jax.process_count(), _distributed.global_state.coordinator_address,
             heartbeat_timeout)
    return True


def _check_coordinator(address: str, process_id: int, timeout: int) -> int:
    """Checks, before jax does, what jax cannot report: on process 0, that the coordinator's port can be
    bound (jax 0.10.2 segfaults on a port in use); on the others, that something answers at ``address``
    within ``timeout`` seconds (jax aborts the process with a C++ stack trace). Returns the seconds of
    ``timeout`` left for jax. Raises ValueError with a one-line reason."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"'{address}' is not HOST:PORT (e.g. 10.0.0.1:1234, a port in 1..65535)")
    port = int(port_text)
    if process_id == 0:
        bind_address = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")
        bind_host, _, bind_port = bind_address.rpartition(":")
        try:
            infos = socket.getaddrinfo(bind_host.strip("[]") or None, bind_port, type=socket.SOCK_STREAM)
            family, kind, proto, _, sockaddr = infos[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gRPC server binds
                probe.bind(sockaddr)
        except OSError as err:
            if err.errno not in (errno.EADDRINUSE, errno.EACCES):  # e.g. no IPv6 here: left to jax/gRPC
                return timeout
            raise ValueError(f"process 0 cannot start the coordinator on {bind_address}: {err.strerror} "
                             f"(another run's coordinator? choose another port)") from None
        return timeout
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return max(1, int(round(timeout - (time.monotonic() - start))))
        except OSError as err:
            if time.monotonic() - start >= timeout:
                raise ValueError(f"nothing answers at {address} after {timeout} s ({err.strerror or err}): start "
                                 f"process 0 with the same --coordinator_address, or check the host and port "
                                 f"(--initialization_timeout sets the wait)") from None
            time.sleep(1.0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def barrier(name: str) -> None:
    """Waits until every process has reached this barrier (a no-op in a single-process run)."""
    if jax.process_count() == 1:
        return
    barrier_id = f"la_iprop/{next(_BARRIER_IDS)}/{name}"
    client = _distributed.global_state.client
    if client is None:  # a multi-process runtime not set up through jax.distributed.initialize
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(barrier_id)
        return
    try:
        client.wait_at_barrier(barrier_id, BARRIER_TIMEOUT_S * 1000)
    except Exception as err:  # jax's runtime error names the processes that did not arrive
        raise RuntimeError(f"process {jax.process_index()}: the other processes did not reach '{name}' "
                           f"({_first_line(err)}); rerun the same command on every process to resume") from None


class process_zero_first:
    """``with process_zero_first(name): ...``: process 0 runs the block first (e.g. writes a new run's
    identity), the other processes once it has finished (and check what it wrote). Process 0 releases
    the others also when its block raises, so they fail on the same check instead of waiting."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if jax.process_count() > 1 and jax.process_index() != 0:
            barrier(self.name)
        return self

    def __exit__(self, *exc):
        if jax.process_count() > 1 and jax.process_index() == 0:
            barrier(self.name)
        return False


def wait_until_visible(paths: Iterable[pathlib.Path], timeout: float = 120.0) -> list[pathlib.Path]:
    """Files another process wrote on a shared file system can show up here a little later (NFS
    attribute caches): polls until every path exists or ``timeout`` seconds passed; returns those
    still missing."""
    missing = [p for p in paths if not p.exists()]
    deadline = time.monotonic() + timeout
    if missing:
        log.info("waiting up to %.0f s for %d file(s) written by other processes to become visible, e.g. %s",
                 timeout, len(missing), missing[0])
    while missing and time.monotonic() < deadline:
        time.sleep(1.0)
        missing = [p for p in missing if not p.exists()]
    return missing


def require_visible(path: pathlib.Path, flag: str, timeout: float = 60.0) -> None:
    """On a process other than 0: ``path``, which process 0 has just written, must show up here (else
    the run folder is not on a shared file system). Raises ConfigError naming ``flag``."""
    if jax.process_count() == 1 or jax.process_index() == 0:
        return
    if wait_until_visible([path], timeout):
        from la_iprop.runs.store import ConfigError
        raise ConfigError(f"{flag}: {path}, written by process 0, is not visible to process {jax.process_index()} "
                          f"after {timeout:.0f} s: the run folder must be on a file system every process shares")
