"""The benchmark entry point's quick mode runs and writes valid JSON (timings are not asserted);
the machine's load is read as the side-by-side benchmark records it."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _scripts_on_path():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@pytest.mark.slow
def test_quick_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "scripts/benchmark.py", f"--json={out}", "iprop", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["environment"]["jax"] and data["environment"]["device"]["backend"] == "cpu"
    assert data["environment"]["processor"] and data["environment"]["la_iprop"]
    timings = data["iprop"]["single_image_ms"]
    assert all(v[0] > 0 for v in timings.values())
    assert max(data["iprop"]["scipy_reference"]["float32"]["rel_max_diff_vs_jax"].values()) < 1e-4


@pytest.mark.slow
def test_quick_bf16_benchmark_times_both_forwards(tmp_path):
    """``bf16 --quick``: both forwards timed side by side, and bfloat16's probabilities differ from float32's
    (a cast that did nothing would show 0) by less than 1."""
    out = tmp_path / "bf16.json"
    result = subprocess.run([sys.executable, "scripts/benchmark.py", f"--json={out}", "bf16", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())["bf16"]
    assert data["forward_ms"]["float32"] > 0 and data["forward_ms"]["bfloat16"] > 0
    assert 0 < data["max_abs_probability_difference"] < 1 and len(data["load"]["rounds"]) == data["repeats"]


@pytest.mark.slow
def test_quick_profile_names_the_layers_of_lite0(tmp_path):
    """``profile --quick``: the forward's FLOPs are Lite0's (0.80 GFLOP per image by XLA's cost analysis),
    and its listed ops are named by the model's layers (the stem convolution among them)."""
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, "scripts/benchmark.py", f"--json={out}", "profile", "--quick",
                             "--top=40"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    forward, gradient = json.loads(out.read_text())["profile"]["rows"]
    assert forward["program"] == "forward" and gradient["program"] == "input_gradient"
    assert forward["gflop"] / forward["batch"] == pytest.approx(0.80, abs=0.05)  # 0.803 with jax 0.10.2
    assert gradient["gflop"] > 1.5 * forward["gflop"]
    layers = [op["layer"] for op in forward["ops"]]
    assert "conv_stem/conv/conv_general_dilated" in layers and any(lay.startswith("blocks_") for lay in layers)
    assert any("blocks_" in op["layer"] for op in gradient["ops"])
    assert all(0 < op["share"] <= 1 for op in forward["ops"] + gradient["ops"])


def test_profile_reads_layers_from_the_hlo_and_times_from_the_trace():
    with _scripts_on_path():
        from bench_profile import layer_names, op_times
    hlo = """
  %fusion.3 = f32[8,112,112,32]{3,2,1,0} fusion(%p0), kind=kCustom, metadata={op_name="jit(<lambda>)/EfficientNetLite/conv_stem/conv/conv_general_dilated" stack_frame_id=9}
  ROOT %fusion.7 = f32[8,3]{1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(<lambda>)/transpose(jvp(EfficientNetLite))/blocks_1/bn0/mul"}
  %constant.1 = f32[] constant(0)
"""
    names = layer_names(hlo)
    assert names == {"fusion.3": "conv_stem/conv/conv_general_dilated", "fusion.7": "backward: blocks_1/bn0/mul"}
    events = [{"ph": "X", "name": "fusion.3", "dur": 5.0}, {"ph": "X", "name": "fusion.3", "dur": 2.0},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 100.0}, {"ph": "i", "name": "fusion.7"}]
    assert op_times(events, names) == {"fusion.3": 7.0}


@pytest.mark.slow
def test_quick_vs_torch_benchmark_runs_side_by_side(tmp_path):
    """``vs-torch --quick``: every part runs and the transcribed official loops give our results."""
    out = tmp_path / "vs_torch.json"
    result = subprocess.run([sys.executable, "scripts/benchmark.py", f"--json={out}", "vs-torch", "--quick",
                             "--lite0_batch=1", "--size=32"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())["vs-torch"]
    if "skipped" in data:
        return
    assert data["torch_threads"] == 2 and data["image_size"] == 32
    assert data["lite0"][0]["ours_vjp_ms"] > 0 and data["lite0"][0]["max_abs_logit_diff"] < 1e-3
    assert data["la"]["rows"][0]["map_correlation_ours_vs_official"] > 0.99
    assert data["metric"]["max_abs_curve_diff_vs_official"] < 1e-3
    assert data["metric"]["forwards_per_image"] == 2 * (32 + 1)
    # The load around every timed round (one per part and row at --quick), and the verdict.
    loads = [data["lite0"][0]["load"], data["la"]["rows"][0]["load"], data["metric"]["load"]]
    assert all(len(load["rounds"]) == 1 for load in loads)
    for r in (load["rounds"][0] for load in loads):
        assert isinstance(r["idle"], bool) and (r["idle"] or r["reasons"])
        assert r["before"]["load_average_1min"] >= 0 and 0 <= r["during"]["own_share"]
    verdict = data["machine_idle"]
    assert verdict["rounds"] == 3 and verdict["idle"] == all(load["idle"] for load in loads)
    assert verdict["own_expected_load"] >= 2 and "README" in verdict["rule"]
    assert ("NOT IDLE" in result.stdout) != verdict["idle"]


@pytest.mark.slow
def test_random_weight_models_cover_lite1_and_lite2_at_their_input_size():
    """``models --random-weights`` times every Lite variant at its own input size (240, 260)."""
    with _scripts_on_path():
        import jax
        import jax.numpy as jnp
        from bench_models import random_model_fn
    for name, size in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        model = random_model_fn(name, jax.random.PRNGKey(0))
        assert model.input_size == size
        assert jax.eval_shape(model, jnp.zeros((2, size, size, 3), jnp.float32)).shape == (2, 1000)


@pytest.mark.slow
def test_subcommand_flags_are_refused_elsewhere():
    """absl flags are global: a flag of another subcommand, or no subcommand, is one line, exit 1."""
    for args, message in ((["la", "--images=3"], "--images: not a flag of la"),
                          (["all", "--batch=1"], "--batch: not a flag of all"),
                          ([], "give one subcommand"), (["la", "--batch=1,x"], "--batch")):
        result = subprocess.run([sys.executable, "scripts/benchmark.py", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr[-2000:])
        assert not result.stdout


# ----------------------------------------------------------------------------- the machine's load
def _fake_proc(root: pathlib.Path, load: str, cpu: list[int], processes: dict[int, tuple[int, str, int]]) -> None:
    """A /proc-like folder: ``processes`` maps pid -> (ppid, comm, utime + stime)."""
    root.mkdir(exist_ok=True)
    (root / "loadavg").write_text(f"{load} 3/120 4567\n")
    (root / "stat").write_text("cpu  " + " ".join(map(str, cpu)) + "\ncpu0 0 0 0 0 0 0 0 0 0 0\n"
                               "cpu1 0 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n")
    for pid, (ppid, comm, jiffies) in processes.items():
        (root / str(pid)).mkdir(exist_ok=True)
        # fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        # cutime cstime priority nice threads itrealvalue starttime ...
        (root / str(pid) / "stat").write_text(f"{pid} ({comm}) R {ppid} 1 1 0 -1 0 0 0 0 0 {jiffies - 1} 1 0 0 "
                                              f"20 0 1 0 {pid * 10} 0 0\n")
        (root / str(pid) / "cmdline").write_bytes(f"/bin/{comm.split()[0]}\0--flag".encode())


def test_cpu_use_from_a_fake_proc(tmp_path):
    """Shares of the machine from two readings: the benchmark's process tree apart, the others by
    share (a name holding spaces and parentheses parsed), a pid reused in between counted whole."""
    with _scripts_on_path():
        from bench_common import cpu_use, idle_verdict, machine_load, proc_snapshot
    proc = tmp_path / "proc"
    # total jiffies: user nice system idle iowait irq softirq steal guest guest_nice (busy excludes idle, iowait)
    _fake_proc(proc, "0.50 0.40 0.30", [1000, 0, 0, 1000, 0, 0, 0, 0, 0, 0],
               {100: (1, "bench", 500), 101: (100, "child", 10), 200: (1, "busy (x) y", 100), 300: (1, "idle", 7),
                400: (1, "old", 50)})
    before = proc_snapshot(proc)
    assert before["cpus"] == 2 and before["load_average"] == (0.5, 0.4, 0.3)
    assert before["processes"][200]["name"] == "busy (x) y" and before["processes"][200]["jiffies"] == 100
    (proc / "400" / "stat").unlink()
    _fake_proc(proc, "2.50 1.00 0.50", [1150, 0, 10, 1040, 0, 0, 0, 0, 0, 0],      # 200 more jiffies, 160 busy
               {100: (1, "bench", 560), 101: (100, "child", 30), 200: (1, "busy (x) y", 150), 300: (1, "idle", 7),
                500: (1, "new", 4)})
    # pid 300 ended and another process got its pid (another start time): its 3 jiffies count whole.
    (proc / "300" / "stat").write_text("300 (reused) S 1 1 1 0 -1 0 0 0 0 0 2 1 0 0 20 0 1 0 99999 0 0\n")
    after = proc_snapshot(proc)
    use = cpu_use(before, after, own_pid=100, top=2)
    assert use["own_share"] == pytest.approx(80 / 200) and use["others_share"] == pytest.approx(57 / 200)
    assert use["busy_share"] == pytest.approx(160 / 200)
    assert use["unattributed_share"] == pytest.approx((160 - 80 - 57) / 200)
    assert [(p["pid"], p["name"], p["share"]) for p in use["top_others"]] == [(200, "busy (x) y", 0.25),
                                                                              (500, "new", 0.02)]
    assert use["top_others"][0]["command"] == "/bin/busy --flag"
    every = cpu_use(before, after, own_pid=None, top=10)           # nobody's tree set apart
    assert every["own_share"] == 0 and every["others_share"] == pytest.approx(137 / 200)

    quiet = {"load_average_1min": 0.2, "busy_share": 0.01, "own_share": 0.0, "others_share": 0.01, "top_others": []}
    assert idle_verdict(quiet, use | {"others_share": 0.0, "busy_share": 0.4}, quiet, own_load=2) == \
        {"idle": True, "reasons": []}
    loaded = idle_verdict(quiet | {"load_average_1min": 2.4}, use, quiet, own_load=2)
    assert not loaded["idle"] and loaded["reasons"][0].startswith("1-min load 2.40 before > 2 + 0.3")
    # others: the visible ones (28.5%), or the busy share beyond the benchmark's own where larger (80% - 40%)
    assert "others used 40% of the machine during (busy (x) y 25%, new 2%)" in loaded["reasons"][1]

    sample = machine_load(0.0, proc=proc, own_pid=100)
    assert sample["load_average_1min"] == 2.5 and sample["cpus"] == 2
    assert {"load_average_5min", "load_average_15min", "own_share", "others_share", "top_others"} <= set(sample)


def test_machine_load_sees_a_busy_process_outside_the_benchmark():
    """On the real /proc: a busy child is the benchmark's own (its tree), or another's when no tree is set apart."""
    with _scripts_on_path():
        from bench_common import machine_load
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        mine = machine_load(0.5, top=1000)
        everyone = machine_load(0.5, own_pid=None, top=1000)
    finally:
        busy.kill()
        busy.wait()
    assert isinstance(mine["load_average_1min"], float) and mine["cpus"] == os.cpu_count()
    assert busy.pid not in [p["pid"] for p in mine["top_others"]] and mine["own_share"] > 0
    shares = {p["pid"]: p["share"] for p in everyone["top_others"]}
    assert shares.get(busy.pid, 0) > 0 and everyone["own_share"] == 0
    assert all(isinstance(p["name"], str) and 0 <= p["share"] <= 1.01 for p in everyone["top_others"])
