"""Helpers shared by the benchmark subcommands: timing (figures, never assertions), the environment
record, the machine's load around a timed round, and the flags several subcommands share."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import flags

from la_iprop.runs.environment import environment as _run_environment

FLAGS = flags.FLAGS


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` after ``warmup`` calls (compilation excluded)."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def peak_memory_bytes() -> int | None:
    """Peak device memory where the backend reports it (GPU/TPU), else None."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends raise or return None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def environment() -> dict:
    """:func:`la_iprop.runs.environment.environment` (versions, device, processor), as every report
    records it, plus the CPUs this process may use."""
    return {**_run_environment(), "cpus": available_cpus()}


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- the machine's load
# A round is "not idle" when, before or after it, the 1-minute load average exceeds the benchmark's
# own expected load by more than LOAD_MARGIN, or when other processes used more than OTHERS_MAX of
# the machine (all cores together) in the sampling window before it, during it or in the window after.
LOAD_MARGIN = 0.3
OTHERS_MAX = 0.05
IDLE_RULE = (f"a round is idle when the 1-minute load average before and after it is at most the benchmark's own "
             f"expected load (the CPUs it keeps busy while timing: XLA:CPU uses every core it may, PyTorch its "
             f"threads) + {LOAD_MARGIN}, and other processes used at most {OTHERS_MAX:.0%} of the machine (all "
             f"cores together, /proc jiffies) in the window before it, during it and in the window after it; "
             f"a figure from a round that was not idle must not go into the README's or docs' tables")

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)   # /proc/stat cpu: user nice system [idle iowait] irq softirq steal


def proc_snapshot(proc: str | os.PathLike = "/proc") -> dict:
    """One reading of ``proc`` (a /proc-like directory): the load averages, the machine's jiffies
    (total and busy, all CPUs) and each process's ``utime + stime``, parent, start time, name and
    command line."""
    proc = pathlib.Path(proc)
    if proc == pathlib.Path("/proc"):
        load = os.getloadavg()
    else:
        load = tuple(float(v) for v in (proc / "loadavg").read_text().split()[:3])
    cpus, total, busy = 0, 0, 0
    try:
        lines = (proc / "stat").read_text().splitlines()
    except OSError:     # no /proc (not Linux): the load averages only
        lines = []
    for line in lines:
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]] + [0] * max(0, 8 - len(fields[1:9]))
            total, busy = sum(values), sum(values[i] for i in _BUSY_FIELDS)
        elif fields and fields[0].startswith("cpu"):
            cpus += 1
    processes = {}
    for entry in (proc.iterdir() if lines else ()):
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:     # gone since the listing, or not ours to read
            continue
        # "pid (comm) state ppid ... utime(14) stime(15) ... starttime(22)": comm may hold spaces and ")".
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        processes[int(entry.name)] = {"ppid": int(rest[1]), "name": name, "jiffies": int(rest[11]) + int(rest[12]),
                                      "start": int(rest[19]), "command": command[:120] or f"[{name}]"}
    return {"time": time.monotonic(), "load_average": load, "cpus": cpus or 1, "total_jiffies": total,
            "busy_jiffies": busy, "processes": processes}


def _tree(processes: dict, root: int | None) -> set[int]:
    """``root`` and its descendants."""
    if root is None:
        return set()
    children: dict[int, list[int]] = {}
    for pid, info in processes.items():
        children.setdefault(info["ppid"], []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, ()))
    return tree


def cpu_use(before: dict, after: dict, *, own_pid: int | None = None, top: int = 3) -> dict:
    """The CPU used between two :func:`proc_snapshot` readings, as shares of the whole machine (all
    cores together: 1.0 = every core busy): by the process tree of ``own_pid`` (None: no process is
    the benchmark's), by every other process summed, and the ``top`` other processes. ``busy`` is the
    machine's non-idle share (steal included), so ``unattributed`` is what no visible process
    accounts for (other containers, the hypervisor)."""
    total = max(after["total_jiffies"] - before["total_jiffies"], 1)
    own = _tree(after["processes"], own_pid) | _tree(before["processes"], own_pid)
    used = {}
    for pid, info in after["processes"].items():
        start = before["processes"].get(pid)
        # a process started in the window (or a reused pid: another start time) counts whole.
        delta = info["jiffies"] - (start["jiffies"] if start and start["start"] == info["start"] else 0)
        if delta > 0:
            used[pid] = delta
    own_share = sum(v for pid, v in used.items() if pid in own) / total
    others = sorted(((v, pid) for pid, v in used.items() if pid not in own), reverse=True)
    others_share = sum(v for v, _ in others) / total
    busy = (after["busy_jiffies"] - before["busy_jiffies"]) / total
    return {"seconds": round(after["time"] - before["time"], 3), "busy_share": round(busy, 4),
            "own_share": round(own_share, 4), "others_share": round(others_share, 4),
            "unattributed_share": round(max(busy - own_share - others_share, 0.0), 4),
            "top_others": [{"pid": pid, "name": after["processes"][pid]["name"], "share": round(v / total, 4),
                            "command": after["processes"][pid]["command"]} for v, pid in others[:top]]}


def machine_load(window: float = 0.5, *, proc: str | os.PathLike = "/proc", own_pid: int | None = -1,
                 top: int = 3) -> dict:
    """The machine's load now: the 1/5/15-minute load averages (``os.getloadavg()``) and
    :func:`cpu_use` over ``window`` seconds, with the benchmark's own process tree set apart
    (``own_pid``: its root; -1: this process; None: every process counts as another's).
    Takes ``window`` seconds; times nothing else."""
    own_pid = os.getpid() if own_pid == -1 else own_pid
    before = proc_snapshot(proc)
    time.sleep(window)
    after = proc_snapshot(proc)
    one, five, fifteen = after["load_average"]
    return {"load_average_1min": one, "load_average_5min": five, "load_average_15min": fifteen,
            "cpus": after["cpus"], **cpu_use(before, after, own_pid=own_pid, top=top)}


def others_share(use: dict) -> float:
    """What others used in a :func:`cpu_use` reading: the visible other processes, or the machine's
    busy share beyond the benchmark's own where that is larger (processes /proc does not show)."""
    return max(use["others_share"], use["busy_share"] - use["own_share"])


def idle_verdict(before: dict, during: dict, after: dict, *, own_load: float) -> dict:
    """Whether a timed round ran on an idle machine (:data:`IDLE_RULE`), from :func:`machine_load`
    before and after it and :func:`cpu_use` over the round itself; ``reasons`` says why not."""
    reasons = []
    for when, sample in (("before", before), ("after", after)):
        if sample["load_average_1min"] > own_load + LOAD_MARGIN:
            reasons.append(f"1-min load {sample['load_average_1min']:.2f} {when} > {own_load:g} + {LOAD_MARGIN}")
    for when, use in (("before", before), ("during", during), ("after", after)):
        share = others_share(use)
        if share > OTHERS_MAX:
            names = ", ".join(f"{p['name']} {p['share']:.0%}" for p in use["top_others"])
            reasons.append(f"others used {share:.0%} of the machine {when}" + (f" ({names})" if names else ""))
    return {"idle": not reasons, "reasons": reasons}


class RoundMonitor:
    """Records the machine's load around each timed round (``with monitor.round(): ...``): a
    :func:`machine_load` before and after it, :func:`cpu_use` over the round and the verdict."""

    def __init__(self, own_load: float, window: float = 0.5):
        self.own_load, self.window, self.rounds = own_load, window, []

    @contextlib.contextmanager
    def round(self):
        before = machine_load(self.window)
        start = proc_snapshot()
        yield
        during = cpu_use(start, proc_snapshot(), own_pid=os.getpid())
        after = machine_load(self.window)
        verdict = idle_verdict(before, during, after, own_load=self.own_load)
        self.rounds.append({**verdict, "before": before, "during": during, "after": after})

    def summary(self, first: int = 0) -> dict:
        """The rounds from index ``first`` on: whether all were idle, how many were not, and why."""
        rounds = self.rounds[first:]
        return {"idle": all(r["idle"] for r in rounds), "not_idle_rounds": sum(not r["idle"] for r in rounds),
                "rounds": rounds}


def side_by_side(calls: dict, repeats: int, monitor: RoundMonitor,
                 warm: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """Median seconds of each call, and the machine's load around each round (``monitor``); one
    warm-up call each (those named in ``warm``; None: all), then the calls alternate per repeat."""
    for name, fn in calls.items():
        if warm is None or name in warm:
            fn()
    times = {name: [] for name in calls}
    first = len(monitor.rounds)
    for _ in range(repeats):
        with monitor.round():
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}, monitor.summary(first)


def not_idle_note(load: dict) -> str:
    """The mark a printed line gets when any of its rounds was not idle (empty when all were)."""
    if load["idle"]:
        return ""
    reasons = next(r["reasons"] for r in load["rounds"] if not r["idle"])
    return f"  [NOT IDLE in {load['not_idle_rounds']}/{len(load['rounds'])} rounds: {'; '.join(reasons)}]"


# ----------------------------------------------------------------------------- flags
class IntListParser(flags.ListParser):
    """A comma-separated list of integers (``--batch=1,8``)."""

    def __init__(self) -> None:
        super().__init__()
        self.syntactic_help = "a comma separated list of integers"

    def parse(self, argument):
        return [int(v) for v in super().parse(argument)]

    def flag_type(self) -> str:
        return "comma separated list of integers"


def define_int_list(name: str, default: list[int] | None, help: str, **kwargs) -> None:  # noqa: A002
    flags.DEFINE(IntListParser(), name, default, help, serializer=flags.CsvListSerializer(","), **kwargs)


# Flags several subcommands take, defined once (absl flags are global); the help says what each reads.
_SHARED: dict[str, tuple] = {
    "batch": (define_int_list, None, "la, iprop, models, methods: batch sizes, comma separated. la, iprop: default "
              "1,8 (--quick: 1); models: one size, default 8 (--quick: 2); methods: one size, default 8."),
    "repeats": (flags.DEFINE_integer, None, "every subcommand: timed calls per setting (default la 2, metrics 1, iprop "
                "9, models 3, methods 1, vs-torch 3; --quick: 1, iprop 3).", {"lower_bound": 1}),
    "model": (flags.DEFINE_string, "efficientnet_lite0", "la, methods: registered model."),
    "random_weights": (flags.DEFINE_bool, False, "la, models: random Flax initialisation instead of the "
                       "checkpoint (timing only)."),
    "spatial_range": (flags.DEFINE_float, 10.0, "la, vs-torch: LA's s."),
    "max_iter": (flags.DEFINE_integer, None, "la, vs-torch: LA's T (default 10; --quick: 2). iprop: IProp's "
                 "max_iter (default: the library's).", {"lower_bound": 1}),
    "sampling_times": (flags.DEFINE_integer, None, "la, vs-torch: LA's K (default 6; vs-torch --quick: 2).",
                       {"lower_bound": 1}),
    "run_chunk": (flags.DEFINE_integer, None, "la, vs-torch: LA's run_chunk, runs evaluated together (default: "
                  "LA's, 1 on CPU, all K elsewhere).", {"lower_bound": 1}),
    "size": (define_int_list, None, "iprop: image H,W (default 224,224; one value: square). vs-torch: the image "
             "side (default 224; --quick: 64, a top-left crop of the la1000 images)."),
}


def define_shared(*names: str) -> None:
    """Defines the shared flags ``names`` unless another subcommand already did."""
    for name in names:
        if name not in FLAGS:
            definer, default, text, *options = _SHARED[name]
            definer(name, default, text, **(options[0] if options else {}))


def refuse(text: str) -> None:
    """A refused setting: one line on stderr, exit status 1."""
    sys.exit(f"error: {text}")


def one_batch(args, default: int) -> int:
    """``--batch`` for the subcommands that take one size."""
    if args.batch is None:
        return default
    if len(args.batch) != 1:
        refuse(f"--batch: this subcommand takes one batch size, got {','.join(map(str, args.batch))}")
    return args.batch[0]
