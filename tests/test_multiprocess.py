"""Multi-process runs for real: ``python -m experiments.imagenet`` as 2 processes on localhost
(jax.distributed on CPU, one device each) against one process, and a process killed mid-run then
resumed by both.

The runs are slow (each scores 4 images under the ``la`` protocol, ~450 Lite0 forwards per image, and
each of its 1-2 processes loads the model and compiles), so the uninterrupted 2-process run is not a
separate test: the resumed run is one, and it must equal the single-process run. Plus 40 s (mostly
sleeping) for the barrier test.

The records must be *equal*, in float32: every process computes batches of one image on one CPU
device, so each map and score comes from the same compiled program as in the single-process run,
and XLA:CPU is deterministic for a given program and thread count (docs/reproducibility.md). The
split of the work over processes changes nothing but who writes which batch file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from la_iprop.runs.report import TIMING_COLUMNS
from la_iprop.runs.store import load_records

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 4 bundled sample photos in batches of 1: each of 2 processes computes 2 batches (b % 2 == its id).
ARGS = ["--method=sm", "--num_images=4", "--batch_size=1", "--seed=3", "--progress=false"]
RUN_TIMEOUT = 420  # s, for one launch of all its processes on a loaded 2-core machine (they take ~1 min)
PEER_DEATH_TIMEOUT = 120  # s, for the survivor of a killed process to stop (heartbeat 10 s + detection)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> pathlib.Path:
    """A compilation cache shared by the runs of this module (later runs skip most compiles)."""
    return tmp_path_factory.mktemp("jax_cache")


class _Launch:
    """Processes of one run, their output in files (no pipe can fill up and block them)."""

    def __init__(self, out: pathlib.Path, cache: pathlib.Path, processes: int, extra=(), tag: str = "",
                 command=None):
        """``command``: the program and its flags (default: ``experiments.imagenet`` with ARGS, --out=out)."""
        command = command or ["-m", "experiments.imagenet", *ARGS, f"--out={out}"]
        self.out, self.logs, self.procs = out, [], []
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        distributed = []
        if processes > 1:
            port = _free_port()
            env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # not every interface
            distributed = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
        for i in range(processes):
            log = out.parent / f"{out.name}{tag}.process{i}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, *command, *distributed,
                     *([f"--process_id={i}"] if processes > 1 else []), *extra],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(f"--- process {i} (exit {p.poll()}), last {chars} characters of {log}:\n"
                         f"{log.read_text(errors='replace')[-chars:]}"
                         for i, (p, log) in enumerate(zip(self.procs, self.logs, strict=True)))

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT, procs=None) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in procs or self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"processes still running after {timeout:.0f} s (killed):\n{self.tails()}")
        return [p.returncode for p in procs or self.procs]

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@contextlib.contextmanager
def _launched(*launches: _Launch):
    """Kills every process still running when the block ends (a failed assertion, a timeout)."""
    try:
        yield launches
    finally:
        for launch in launches:
            launch.kill()


def _records(out: pathlib.Path) -> dict:
    """Everything a run's results are: the CSV rows (but timings), and per image the map, the
    prediction, the AUCs and the curves, merged from every batch file."""
    with open(out / "results.csv") as f:
        rows = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]
    stored = load_records(out, "sm", "la", attributions=True)
    return {"rows": rows, **{k: v for k, v in stored.items() if k != "seconds"}}


def _assert_same_records(got: pathlib.Path, expected: pathlib.Path):
    a, b = _records(got), _records(expected)
    assert a["rows"] == b["rows"]
    assert len(a["rows"]) == 4 and a.keys() == b.keys()
    assert a["attribution"].shape == (4, 224, 224, 3) and a["insertion_curve"].shape == (4, 225)
    for key in a:
        if key != "rows":
            assert np.array_equal(a[key], b[key]), f"{key} differs"


@pytest.mark.slow
def test_killed_process_then_resumed_gives_the_single_process_records(tmp_path, jax_cache):
    """A 2-process run with process 1 SIGKILLed after its first batch file, then resumed by both
    processes, merges exactly the records of one process running the same flags (launched at the
    same time as the killed run: the cores are shared either way)."""
    single = _Launch(tmp_path / "single", jax_cache, 1)
    out = tmp_path / "killed"
    first = _Launch(out, jax_cache, 2, extra=["--heartbeat_timeout=10"], tag=".first")
    with _launched(single, first):
        victim, survivor = first.procs[1], first.procs[0]
        own = out / "batches" / "sm" / "batch_00001.npz"  # process 1's first batch (batches 1 and 3 are its)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not own.exists() and victim.poll() is None and survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert own.exists() and victim.poll() is None, f"process 1 wrote no batch file:\n{first.tails()}"
        victim.kill()  # SIGKILL
        victim.wait()
        killed_at = time.monotonic()
        # The survivor cannot finish the run (the merge waits for every process): it must stop by itself,
        # with an error, within about the heartbeat timeout, not wait for the dead process forever.
        (code,) = first.wait(PEER_DEATH_TIMEOUT, procs=[survivor])
        assert code != 0, first.tails()
        assert time.monotonic() - killed_at < PEER_DEATH_TIMEOUT
        log = first.log(0).lower()
        assert "heartbeat" in log or "died" in log, first.tails()  # jax's reason names the dead process
        assert single.wait() == [0], single.tails()
    assert not (out / "results.csv").exists()
    kept = own.read_bytes(), own.stat().st_mtime_ns

    resumed = _Launch(out, jax_cache, 2, tag=".resumed")  # the same flags (a free port for the new coordinator)
    with _launched(resumed):
        assert resumed.wait() == [0, 0], resumed.tails()
    for i in (0, 1):  # each process took its own batches (number % 2 == its id)
        assert f"process {i} of 2: its 2 of the 4 batches (number % 2 == {i}) are written" in resumed.log(i), \
            resumed.tails()
    assert f"results written to {out}" in resumed.log(0)  # process 0 merged them into the reports
    assert "results written to" not in resumed.log(1)
    assert (out / "summary.json").exists() and (out / "heatmaps.png").exists()
    assert (own.read_bytes(), own.stat().st_mtime_ns) == kept  # the killed process's finished batch is kept
    _assert_same_records(out, single.out)
    leftovers = [p for d in ("batches", "scores") for p in (out / d).rglob(".*.tmp")]
    assert not leftovers, f"unfinished writes left in the run: {leftovers}"


def _table(path: pathlib.Path, drop=("seconds", "seconds_per_image")) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_reproduce_and_sweep_on_two_processes_equal_one(tmp_path, jax_cache):
    """``experiments.reproduce`` (with its LA seed run) and ``experiments.sweep`` as 2 processes: the same
    tables as one process, written by process 0 alone. With the tiny model (32x32), so it takes seconds
    of compute; most of the time is start-up and compilation."""
    tiny = [str(ROOT / "tests" / "tiny_model.py")]
    common = ["--model=tiny_cnn", "--data=samples", "--num_images=4", "--batch_size=1", "--progress=false"]
    reproduce = [*tiny, "experiments.reproduce", "--name=mp", "--method=sm,la", "--la_seeds=2",
                 "--hparams=la.max_iter=2,la.sampling_times=2", *common]
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"methods": ["sm", "ig"], "models": ["tiny_cnn"], "data": "samples",
                                  "num_images": 4, "batch_size": 1, "protocols": ["la", "rise"]}))
    sweep = [*tiny, "experiments.sweep", f"--config={config}", "--progress=false"]
    logs = {}
    for processes in (1, 2):  # (a launch starts its processes)
        base = tmp_path / f"p{processes}"
        base.mkdir()
        for name, command in (("reproduce", [*reproduce, f"--runs_dir={base / 'runs'}",
                                             f"--results_dir={base / 'results'}"]),
                              ("sweep", [*sweep, f"--out={base / 'sweep'}"])):
            launch = _Launch(base / name, jax_cache, processes, command=command)
            with _launched(launch):
                assert launch.wait() == [0] * processes, launch.tails()
            logs[processes, name] = [launch.log(i) for i in range(processes)]
    one, two = tmp_path / "p1", tmp_path / "p2"
    for name in ("results.csv", "la_seed1.csv"):
        got, expected = _table(two / "results" / "reproduction" / "mp" / name), \
            _table(one / "results" / "reproduction" / "mp" / name)
        assert got == expected and len(got) == 4 * (6 if name == "results.csv" else 1) * 2, name  # variants x protocols
    assert (two / "results" / "REPRODUCTION.md").read_text().count("## Run `mp`") == 1
    assert "process 1 of 2: its batches are written; process 0 writes the results" in logs[2, "reproduce"][1]
    assert _table(two / "sweep" / "sweep.csv") == _table(one / "sweep" / "sweep.csv")
    assert len(_table(two / "sweep" / "sweep.csv")) == 2 * 2  # cells x protocols
    assert "| cell |" in logs[2, "sweep"][0] and "| cell |" not in logs[2, "sweep"][1]  # process 0 prints it


BARRIER_SCRIPT = """
import sys, time
from la_iprop.runs import multihost
process, port, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
multihost.initialize(f"127.0.0.1:{port}", 2, process)
start = time.monotonic()
with multihost.process_zero_first("identity"):  # process 0 first (it writes), then the others (they check)
    if process == 0:
        time.sleep(delay)
    print(f"{process} block {time.monotonic() - start:.1f}", flush=True)
multihost.barrier("batches written")
print(f"{process} barrier {time.monotonic() - start:.1f}", flush=True)
"""


@pytest.mark.slow
def test_processes_arriving_far_apart_pass_the_barriers(tmp_path):
    """The processes of a run finish their batches minutes apart. On CPU, jax's
    ``sync_global_devices`` (a Gloo all-gather) fails when they arrive more than 30 s apart (jax 0.10.2:
    'Gloo context initialization failed: DEADLINE_EXCEEDED ... 30s'); the runner's barriers go through
    the coordination service and wait. Little CPU: one process sleeps 35 s."""
    port, delay = _free_port(), 35
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, "-c", BARRIER_SCRIPT, str(i), str(port), str(delay)],
                                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=delay + 120)
    except subprocess.TimeoutExpired:
        pytest.fail("barrier processes still running: " + " | ".join(log.read_text()[-1500:] for log in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-2500:] for o in outputs)
    times = {(int(line.split()[0]), line.split()[1]): float(line.split()[2])
             for o in outputs for line in o.splitlines() if line[:2] in ("0 ", "1 ")}
    assert times[(1, "block")] >= delay - 1  # process 1 ran its block after process 0's
    assert times[(1, "barrier")] >= delay - 1


@pytest.mark.parametrize("args,message", [
    (["--distributed"], "coordinator_address should be defined. (not detected from the environment"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], "process_id < num_processes"),
    (["--num_processes=0"], "--num_processes=0: 0 is not a positive integer"),
])
@pytest.mark.slow
def test_bad_distributed_flags_are_one_line(args, message, tmp_path):
    _assert_one_line_error(_run_imagenet_sm(tmp_path, *args), message)
    assert not (tmp_path / "x").exists()


def _run_imagenet_sm(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.imagenet", "--method=sm", f"--out={tmp_path / 'x'}",
                           *args], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", **env), capture_output=True,
                          text=True, timeout=120)


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_unreachable_coordinator_and_busy_port_are_one_line(tmp_path):
    """jax 0.10.2 aborts a process whose coordinator never answers (a C++ check failure with a stack
    trace, after --initialization_timeout) and segfaults process 0 when the coordinator's port is in
    use; the flags are checked first."""
    closed = _free_port()  # nothing listens there
    result = _run_imagenet_sm(tmp_path, f"--coordinator_address=127.0.0.1:{closed}", "--num_processes=2",
                              "--process_id=1", "--initialization_timeout=2")
    _assert_one_line_error(result, f"nothing answers at 127.0.0.1:{closed} after 2 s")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        result = _run_imagenet_sm(tmp_path, f"--coordinator_address=127.0.0.1:{busy}", "--num_processes=2",
                                  "--process_id=0",  # (the interface of the listener: no IPv6 dual-stack needed)
                                  JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{busy}")
    _assert_one_line_error(result, f"process 0 cannot start the coordinator on 127.0.0.1:{busy}: Address already in use")
    result = _run_imagenet_sm(tmp_path, "--coordinator_address=localhost", "--num_processes=2", "--process_id=1")
    _assert_one_line_error(result, "'localhost' is not HOST:PORT")
    assert not (tmp_path / "x").exists()
    for program in ("experiments.evaluate", "experiments.sweep", "experiments.reproduce"):  # the same flags
        result = subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_model.py"), program,
                                 f"--coordinator_address=127.0.0.1:{closed}", "--num_processes=2", "--process_id=1",
                                 "--initialization_timeout=1"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                capture_output=True, text=True, timeout=120)
        _assert_one_line_error(result, f"nothing answers at 127.0.0.1:{closed} after 1 s")


def test_each_process_moves_aside_only_the_unfinished_writes_of_its_own_batches(tmp_path):
    """A killed process leaves ``.batch_*.tmp`` files; on resume, process 1 of 2 quarantines those of its
    batches (1, 3: only it writes them) and leaves another process's (possibly being written) alone."""
    from la_iprop.runs import store

    folder = tmp_path / "batches" / "sm"
    folder.mkdir(parents=True)
    names = [".batch_00001.npz.k1ll3d.tmp", ".batch_00002.npz.w0rk1ng.tmp", ".batch_00003.npz.x.tmp",
             ".batch_00009.npz.x.tmp", ".hidden"]
    for name in names:
        (folder / name).write_bytes(b"partial")
    moved = store.scan(tmp_path, folder, lambda b, path: None, batches=4, mine=lambda b: b % 2 == 1, strays=False)
    assert sorted(path for path, _ in moved) == ["batches/sm/.batch_00001.npz.k1ll3d.tmp",
                                                 "batches/sm/.batch_00003.npz.x.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == [".batch_00002.npz.w0rk1ng.tmp", ".batch_00009.npz.x.tmp",
                                                        ".hidden"]
    assert (tmp_path / "quarantine" / "batches" / "sm" / ".batch_00003.npz.x.tmp").exists()
