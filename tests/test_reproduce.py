"""The reproduction report: the papers' claims are checked against the run's own rows."""

from __future__ import annotations

import json

from experiments.reproduce import write_report


def _row(insertion: float, deletion: float) -> dict:
    return {"num_images": 4, "insertion": insertion, "deletion": deletion, "ins_minus_del": insertion - deletion,
            "dir": deletion / insertion, "seconds_per_image": 1.0}


def _store(results_dir, name: str, rows: dict, iprop_settings: dict | None) -> None:
    run = results_dir / "reproduction" / name
    run.mkdir(parents=True)
    summary = {"flags": {"model": "efficientnet_lite0", "data": "samples", "start": 0, "settings": "quick",
                         "seed": 0, "protocol": "la", "hparams": {}, "iprop_hparams": {}},
               "resolved": {"iprop": iprop_settings} if iprop_settings else {},
               "device": {"backend": "cpu", "kind": "cpu", "local_devices": 1}, "versions": {"jax": "x"},
               "results": rows}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "command.txt").write_text(f"python -m experiments.reproduce --name={name}\n")


def test_claims_follow_the_rows(tmp_path):
    rows = {"la": _row(0.5, 0.10), "sm": _row(0.2, 0.05), "ig": _row(0.1, 0.08),
            "la+ctrl": _row(0.4, 0.2), "la+iprop": _row(0.45, 0.2),     # beats its control, not the raw map
            "sm+ctrl": _row(0.3, 0.1), "sm+iprop": _row(0.27, 0.1),     # beats the raw map, not its control
            "ig+ctrl": _row(0.2, 0.1), "ig+iprop": _row(0.3, 0.1)}      # beats both
    _store(tmp_path, "run_a", rows, {"gamma": 0.99})
    _store(tmp_path, "run_b", {"la": _row(0.1, 0.3), "sm": _row(0.2, 0.05)}, None)
    text = write_report(tmp_path).read_text()
    section_a, section_b = text.split("## Run `run_b`")
    assert "LA has the highest insertion AUC of all methods (LA paper, Table 1, four ImageNet models): reproduces" \
        in section_a
    assert "LA has the lowest deletion AUC of all methods (LA paper, Table 1; in the paper LA is best or close " \
           "to best): does **not** reproduce" in section_a   # sm deletes better
    assert "IProp improves insertion − deletion for most methods (IProp paper): reproduces" in section_a  # sm, ig
    assert "IProp's propagation itself (vs its γ = 0 control, the same per-pixel reward without propagation) " \
           "improves insertion − deletion for most methods: reproduces" in section_a  # la, ig
    assert "Against the raw map, IProp raises ins − del for: sm, ig; lowers it for: la." in section_a
    assert "Against the γ = 0 control, IProp raises ins − del for: la, ig; lowers it for: sm." in section_a
    assert 'IProp settings in effect: `{"gamma": 0.99}`' in section_a
    # Rows are ordered method, control, IProp.
    assert section_a.index("| la+ctrl |") < section_a.index("| la+iprop |") < section_a.index("| sm |")
    # A run without IProp variants cannot check the IProp claims; LA loses on insertion there.
    assert "IProp improves insertion − deletion for most methods (IProp paper): not checkable" in section_b
    assert "LA has the highest insertion AUC of all methods (LA paper, Table 1, four ImageNet models): does " \
           "**not** reproduce" in section_b
