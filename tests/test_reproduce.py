"""The reproduction report: every claim is a paired comparison with a CI and a verdict, per protocol."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from la_iprop.studies.reproduction import read_scores, write_report

N = 24


def _write_csv(path, rows: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], with_protocol: bool) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *(["protocol"] if with_protocol else []), "index", "insertion", "deletion"])
        for (protocol, method), (ins, dele) in rows.items():
            for i in range(N):
                writer.writerow([method, *([protocol] if with_protocol else []), 3 * i, ins[i], dele[i]])


def _store(results_dir, name: str, rows: dict, *, protocols: list[str] | None, seeds: dict | None = None) -> None:
    run = results_dir / "reproduction" / name
    run.mkdir(parents=True)
    flags = {"model": "efficientnet_lite0", "data": "samples", "start": 0, "settings": "quick", "seed": 0,
             "hparams": {}, "iprop_hparams": {}}
    flags.update({"protocols": protocols} if protocols else {"protocol": "la"})
    summary = {"flags": flags, "resolved": {"iprop": {"gamma": 0.99}},
               "device": {"backend": "cpu", "kind": "cpu", "local_devices": 1}, "versions": {"jax": "x"}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "command.txt").write_text(f"python -m experiments.reproduce --name={name}\n")
    _write_csv(run / "results.csv", rows, with_protocol=protocols is not None)
    for seed, seed_rows in (seeds or {}).items():
        _write_csv(run / f"la_seed{seed}.csv", seed_rows, with_protocol=True)


def test_claims_are_paired_verdicts_per_protocol(tmp_path):
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.1, 0.5, N)           # shared by every method: cancels in paired differences

    def noise(scale=0.01):
        return rng.normal(0, scale, N)

    sm = (difficulty, 0.3 * difficulty)
    la = (difficulty + 0.2 + noise(), 0.3 * difficulty + 0.05 + noise())     # better insertion, worse deletion
    ig = (difficulty + noise(0.05), 0.3 * difficulty + 0.05 + noise())      # deletion like LA's: inconclusive
    rows = {}
    for protocol in ("la", "rise"):
        rows.update({(protocol, "sm"): sm, (protocol, "la"): la, (protocol, "ig"): ig,
                     (protocol, "ig+ctrl"): (ig[0] + 0.1 + noise(), ig[1]),
                     (protocol, "ig+iprop"): (ig[0] + 0.3 + noise(), ig[1]),           # beats raw and control
                     (protocol, "sm+ctrl"): (sm[0] + noise(0.05), sm[1]),
                     (protocol, "sm+iprop"): (sm[0] + noise(0.05), sm[1])})            # no real effect
    seed_rows = {(p, "la"): (difficulty + 0.21 + noise(), la[1]) for p in ("la", "rise")}
    _store(tmp_path, "run_a", rows, protocols=["la", "rise"], seeds={1: seed_rows, 2: seed_rows})
    old = {("la", "la"): (difficulty - 0.1 + noise(), 0.3 * difficulty), ("la", "sm"): sm}
    _store(tmp_path, "run_b", old, protocols=None)

    text = write_report(tmp_path).read_text()
    section_a, section_b = text.split("## Run `run_b`")
    assert section_a.count("### Protocol `la`") == 1 and section_a.count("### Protocol `rise`") == 1
    assert f"LA has the highest insertion AUC of all methods (LA paper, Table 1): **holds** (holds against 2 of 2; " \
           f"{N} images); across all 3 LA seeds it holds against 2 of 2." in section_a
    assert "LA has the lowest deletion AUC of all methods (LA paper, Table 1): **does not hold** (holds against 0 " \
           "of 2; inconclusive against ig; does not hold against sm;" in section_a
    assert "Against the raw map, IProp raises insertion − deletion for 1 of 2 methods with a CI excluding 0 (ig)" \
        in section_a
    assert "Against the γ = 0 control, IProp raises insertion − deletion for 1 of 2 methods with a CI excluding " \
           "0 (ig)" in section_a
    assert "LA over 3 seeds (target draws)" in section_a
    # Rows are ordered method, control, IProp; the CI cell brackets the mean.
    assert section_a.index("| ig+ctrl |") < section_a.index("| ig+iprop |") < section_a.index("| la |")
    # An old run without a protocol column is read as protocol la; LA loses there on insertion.
    assert "### Protocol `la`" in section_b and "### Protocol `rise`" not in section_b
    assert "LA has the highest insertion AUC of all methods (LA paper, Table 1): **does not hold**" in section_b


def test_read_scores_sorts_by_image_and_splits_protocols(tmp_path):
    ins, dele = np.linspace(0.1, 0.5, N), np.linspace(0.0, 0.1, N)
    path = tmp_path / "results.csv"
    _write_csv(path, {("la", "sm"): (ins, dele), ("rise", "sm"): (ins[::-1], dele)}, with_protocol=True)
    scores = read_scores(path)
    assert set(scores) == {"la", "rise"}
    np.testing.assert_array_equal(scores["la"]["sm"].index, 3 * np.arange(N))
    np.testing.assert_allclose(scores["rise"]["sm"].insertion, ins[::-1])


@pytest.mark.slow
def test_interim_report_keeps_the_images_finished_everywhere(tmp_path):
    """``--interim``: a run in progress is reported on the images finished for every variant under
    every protocol, with the same per-image scores as the finished run, and marked interim."""
    import shutil

    import pytest

    from la_iprop.runs.config import RunConfig
    from la_iprop.runs.engine import report_interim, run
    from la_iprop.runs.store import ConfigError, scores_path
    from la_iprop.studies.reproduction import _section

    config = RunConfig(methods=("sm",), num_images=2, seed=3, batch_size=1, protocols=("la", "rise"),
                       out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="holds no run"):
        report_interim(config)
    run(config, progress=False)
    full = read_scores(tmp_path / "run" / "results.csv")
    scores_path(config.out, "rise", "sm", 1).unlink()  # image 1 is not finished under every protocol
    summary = report_interim(config)
    assert summary["interim"] == {"images": 1, "of": 2}
    interim = read_scores(tmp_path / "run" / "results.csv")
    for protocol in ("la", "rise"):
        assert list(interim[protocol]["sm"].index) == [0]
        assert interim[protocol]["sm"].insertion[0] == full[protocol]["sm"].insertion[0]
    section = tmp_path / "results" / "reproduction" / "interim"
    section.mkdir(parents=True)
    for name in ("summary.json", "results.csv"):
        shutil.copyfile(tmp_path / "run" / name, section / name)
    (section / "command.txt").write_text("python -m experiments.reproduce --name=interim\n")
    assert "**interim**: 1 of 2 images" in _section("interim", section, {})
    scores_path(config.out, "la", "sm", 0).unlink()
    with pytest.raises(RuntimeError, match="no image .* is finished for every method and protocol"):
        report_interim(config)
