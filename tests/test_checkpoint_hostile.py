"""The checkpoint readers against crafted hostile files (zip, legacy and msgpack formats).

Every hostile file is loaded in a subprocess under an address-space limit (RLIMIT_AS),
so a bomb fails the test instead of the machine: one subprocess loops over all cases
and reports per-case JSON lines; the crash-type cases also run one per subprocess with
the reader imported on its own. Each must end in one CheckpointError whose single-line
message names the file, no payload may run, and a secret planted in the loading
process's memory must never come back in a tensor. The files are built by
tests/hostile_checkpoints.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import hostile_checkpoints as hc  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "hostile_checkpoints.py"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
STANDALONE_CAP = 1 * 2**30  # the reader alone (numpy, no jax) needs ~150 MiB of address space
CLI_CAP = 4 * 2**30         # jax's CPU client alone reserves ~1.5 GiB


# Every test shares the hostile files' subprocess run (about 15 s in all): the full suite's tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from la_iprop.models import load_model, load_state_dict
    from la_iprop.models.zoo import EMBEDDED_LITE0_CHECKPOINT, save_flax_checkpoint

    directory = tmp_path_factory.mktemp("hostile")
    lite0_msgpack = directory / "lite0.msgpack"
    save_flax_checkpoint(load_model(hc.LITE0), lite0_msgpack)
    lite0 = {"state_dict": load_state_dict(EMBEDDED_LITE0_CHECKPOINT()), "msgpack": str(lite0_msgpack)}
    marker = directory / "PWNED"
    secret = f"LEAK-ME-{uuid.uuid4().hex}"
    cases = hc.build_cases(directory, marker, secret.encode(), lite0)
    cases.append({**cases[0], "name": "control_after_all"})  # nothing a hostile file did may persist
    spec = directory / "cases.json"
    spec.write_text(json.dumps({"secret": secret, "cases": cases}))
    results_path = directory / "results.jsonl"
    proc = subprocess.run([sys.executable, str(HELPER), "run", str(spec), str(results_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    results = {r["name"]: r for r in lines}
    return {"proc": proc, "cases": cases, "results": results, "marker": marker, "secret": secret,
            "by_name": {c["name"]: c for c in cases}, "directory": directory}


def test_there_are_enough_cases_in_every_format(hostile):
    hostile_cases = [c for c in hostile["cases"] if c["expect"] == "error"]
    formats = {prefix: sum(c["name"].startswith(prefix) for c in hostile_cases) for prefix in ("zip", "legacy", "msgpack")}
    assert len(hostile_cases) >= 30 and all(n >= 8 for n in formats.values()), formats


def test_runner_survived_every_case_under_the_address_space_limit(hostile):
    proc, results = hostile["proc"], hostile["results"]
    assert proc.returncode == 0, f"runner died with {proc.returncode}: {proc.stderr[-3000:]}"
    assert set(results) - {"__limits__"} == {c["name"] for c in hostile["cases"]}
    limits = results["__limits__"]
    assert limits["rlimit_as"] <= limits["vm_after_import"] + 2 * 2**30


def test_every_hostile_file_is_one_checkpoint_error_naming_the_file(hostile):
    problems = []
    for case in hostile["cases"]:
        if case["expect"] != "error":
            continue
        result = hostile["results"].get(case["name"], {"outcome": "missing"})
        message = result.get("message", "")
        if result["outcome"] != "CheckpointError":
            problems.append(f"{case['name']}: {result['outcome']}: {message}")
        elif "\n" in message or case["path"] not in message:
            problems.append(f"{case['name']}: message is not one line naming the file: {message!r}")
        elif case["match"] and not re.search(case["match"], message):
            problems.append(f"{case['name']}: {message!r} does not match {case['match']!r}")
    assert not problems, "\n".join(problems)


def test_legitimate_controls_load_and_nothing_leaks(hostile):
    results = hostile["results"]
    for case in hostile["cases"]:
        if case["expect"] == "ok":
            assert results[case["name"]]["outcome"] == "ok", results[case["name"]]
    # The detector works: a file that really contains the secret is caught ...
    assert results["control_secret_in_file"]["leaked"]
    # ... and no other load, accepted or refused, returned bytes of the planted secret.
    leaks = [name for name, r in results.items() if r.get("leaked") and name != "control_secret_in_file"]
    assert not leaks
    for name in ("zip_negative_offset", "legacy_negative_offset_secret", "zip_negative_stride",
                 "legacy_negative_stride"):
        assert results[name]["outcome"] == "CheckpointError"


def test_no_payload_ran(hostile):
    assert not hostile["marker"].exists()


@pytest.mark.parametrize("name", ["zip_huge_negative_stride", "legacy_huge_negative_stride", "zip_stride0_1gib",
                                  "legacy_stride0_60gib", "zip_bomb_512mib", "zip_size_2_63", "zip_deep_nesting",
                                  "zip_repeated_full_views", "zip_memo_index_2_32", "zip_binbytes8_2_63",
                                  "legacy_negative_offset_secret"])
def test_crash_type_cases_one_per_process(hostile, name):
    """Former SIGSEGV / MemoryError cases, each in a fresh process with the reader alone under 1 GiB."""
    path = hostile["by_name"][name]["path"]
    proc = subprocess.run([sys.executable, str(HELPER), "one", path, str(STANDALONE_CAP)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode} {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "CheckpointError" and path in result["message"], result
    assert result["vm_after_import"] < STANDALONE_CAP / 2


def _limited_command(cap: int, script: pathlib.Path, *args: str) -> list[str]:
    """``python script args`` with RLIMIT_AS set first (no preexec_fn: this process runs jax threads)."""
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')").format(cap)
    return [sys.executable, "-c", code, str(script), *args]


def test_convert_weights_refuses_hostile_and_nonfinite_files(hostile, tmp_path):
    """No .msgpack is written, exit status 1, one line naming the file (and the tensor)."""
    script = ROOT / "scripts" / "convert_weights.py"
    leak = hostile["by_name"]["legacy_negative_offset_secret"]["path"]
    nan = hostile["by_name"]["lite0_nan_weights"]["path"]
    runs = {name: subprocess.Popen(_limited_command(CLI_CAP, script, hc.LITE0, path, "--out",
                                                    str(tmp_path / f"{name}.msgpack")),
                                   cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, path in (("leak", leak), ("nan", nan))}
    outputs = {name: run.communicate(timeout=300) for name, run in runs.items()}
    for name, path in (("leak", leak), ("nan", nan)):
        stdout, stderr = outputs[name]
        assert runs[name].returncode == 1, (name, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and path in lines[0], stderr
        assert not (tmp_path / f"{name}.msgpack").exists()
    assert "storage offset" in outputs["leak"][1]
    assert re.search(r"non-finite weights in 1 tensor\(s\): params/\S+ \(\d+ NaN, 0 Inf\)", outputs["nan"][1])


def test_convert_weights_allow_nonfinite_opt_out(hostile, tmp_path):
    import importlib.util

    from la_iprop.models import load_model

    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "scripts" / "convert_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    nan = hostile["by_name"]["lite0_nan_weights"]["path"]
    out = tmp_path / "nan.msgpack"
    assert module.main([hc.LITE0, nan, "--out", str(out), "--allow_nonfinite"]) == 0
    model = load_model(hc.LITE0, str(out), allow_nonfinite=True)
    import jax
    assert any(np.isnan(np.asarray(leaf)).any() for leaf in jax.tree_util.tree_leaves(model.variables))
