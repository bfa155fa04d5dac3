"""Studies as configurations of the run engine: named method variants, named IProp variants, coarse
protocols, the LA ablations and the IProp tuning study end to end on the tiny model."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from la_iprop.iprop import IPropConfig
from la_iprop.iprop.tuning import coarse_points
from la_iprop.metrics import evaluate, get_protocol
from la_iprop.runs import ConfigError, RunConfig
from la_iprop.runs.config import base_method, method_variants, resolve_protocol, split_variant
from la_iprop.runs.validation import validate
from la_iprop.studies.iprop_tuning import criterion_score, grid_from, variant_label

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_model.py"


@pytest.mark.parametrize("every", [2, 3])
def test_coarse_protocol_is_the_curve_sampled_at_coarse_points(every):
    """``la_every<k>`` scores exactly the points coarse_points picks from the la curve."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
    maps = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(8 * 8 * 3, 5)), jnp.float32)

    def logits(x):
        return x.reshape(x.shape[0], -1) @ weights

    base = get_protocol("la", step=24)
    fine = evaluate(logits, images, maps, protocol=base)
    coarse_protocol = resolve_protocol(f"la_every{every}")
    assert coarse_protocol.step == get_protocol("la").step * every and coarse_protocol.name == f"la_every{every}"
    coarse = evaluate(logits, images, maps, protocol=get_protocol(base, step=24 * every))
    points = coarse_points(fine.insertion_curves.shape[1], every)
    np.testing.assert_allclose(coarse.insertion_curves, fine.insertion_curves[:, points], rtol=1e-6)
    np.testing.assert_allclose(coarse.deletion_curves, fine.deletion_curves[:, points], rtol=1e-6)


@pytest.mark.parametrize("name", ["la_every0", "la_everyx", "nope", "rise_every-2"])
def test_bad_protocol_names_are_one_line(name):
    with pytest.raises(ValueError, match="unknown protocol"):
        resolve_protocol(name)


def test_named_method_and_iprop_variants():
    config = RunConfig(methods=("la", "la@s5"), hparams={"la@s5": {"spatial_range": 5.0}},
                       iprop_variants={"g5": {"gamma": 0.5}}, out="unused")
    assert base_method("la@s5") == "la"
    assert method_variants(config) == ["la", "la@s5", "la+iprop@g5", "la@s5+iprop@g5"]
    assert split_variant(config, "la@s5+iprop@g5") == ("la@s5", {"gamma": 0.5})
    assert split_variant(config, "la@s5") == ("la@s5", None)
    resolved = config.resolved()["methods"]
    assert resolved["la@s5"]["spatial_range"] == 5.0 and resolved["la"]["spatial_range"] == 10.0
    # the IProp variants are not part of the identity: they are added to a run like a protocol
    assert config.identity() == RunConfig(methods=("la", "la@s5"), hparams={"la@s5": {"spatial_range": 5.0}},
                                          out="unused").identity()


@pytest.mark.parametrize("changes,match", [
    ({"methods": ("la@s-5",)}, "label of a named variant"),
    ({"methods": ("nope@x",)}, "unknown method"),
    ({"iprop_variants": {"bad label": {}}}, "letters, digits"),
    ({"iprop_variants": {"g": {"gamma": 2.0}}}, "iprop_variants: g"),
])
def test_bad_variants_are_refused(changes, match):
    config = RunConfig(**{"methods": ("sm",), "out": "unused", **changes})
    with pytest.raises(ConfigError, match=match):
        validate(config)


def test_from_mapping_refuses_unknown_settings():
    with pytest.raises(ConfigError, match="unknown run settings"):
        RunConfig.from_mapping({"methods": ["sm"], "num_imgs": 3})
    config = RunConfig.from_mapping({"methods": ["sm"], "protocol": "rise"}, out="x")
    assert config.methods == ("sm",) and config.protocols == ("rise",)


def test_tuning_labels_and_scores():
    assert variant_label(IPropConfig(gamma=0.0, reward="sum")) == "g0_sum"
    assert variant_label(IPropConfig(gamma=0.9)).replace("_", "").isalnum()
    per_method = {"a": {"ins_minus_del": 0.2, "dir": 0.5}, "b": {"ins_minus_del": 0.4, "dir": 0.7}}
    assert criterion_score(per_method, "ins_minus_del") == pytest.approx(0.3)
    assert criterion_score(per_method, "dir") == pytest.approx(-0.6)  # lower dir is better
    with pytest.raises(ValueError, match="unknown axes"):
        grid_from({"gama": [0.5]})
    with pytest.raises(ValueError, match="no values"):
        grid_from({"gamma": []})


def test_la_ablations_direct_comparisons():
    """A pair is scored as a − b on the images both variants have; bad pairs are one-line errors."""
    from la_iprop.metrics.comparison import Scores
    from la_iprop.studies.la_ablations import check_pairs, pair_rows

    variants = {"default": {}, "pgd_box": {}, "pgd_none": {}}
    rng = np.random.default_rng(0)
    box = Scores(np.arange(6), rng.uniform(size=6), rng.uniform(size=6))
    none = Scores(np.arange(2, 8), box.insertion[[2, 3, 4, 5, 0, 1]] + 0.5, rng.uniform(size=6))
    scores = {"la": {"la@pgd_box": box, "la@pgd_none": none}, "rise": {"la@pgd_box": box}}
    rows = pair_rows(scores, check_pairs([("pgd_none", "pgd_box")], variants))
    assert [(r["a"], r["b"], r["protocol"]) for r in rows] == [("pgd_none", "pgd_box", "la")]  # rise: one side only
    shared = np.arange(2, 6)
    diff = (none.insertion[:4] - none.deletion[:4]) - (box.insertion[shared] - box.deletion[shared])
    assert rows[0]["comparison"].n == 4
    assert rows[0]["comparison"].differences["ins_minus_del"].mean == pytest.approx(diff.mean())
    for pairs, match in [([("pgd_none",)], "is not a pair"), (["ab"], "is not a pair"),
                         ([("pgd_none", "pgd")], "'pgd' is not a variant"), ([("pgd_box", "pgd_box")], "itself")]:
        with pytest.raises(ValueError, match=match):
            check_pairs(pairs, variants)


def _cli(module: str, config: pathlib.Path, tmp_path: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(TINY), module, f"--config={config}", f"--runs_dir={tmp_path / 'runs'}",
                           f"--results_dir={tmp_path / 'results'}", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _smoke_config(tmp_path: pathlib.Path, name: str, body: str) -> pathlib.Path:
    path = tmp_path / f"{name}.py"
    path.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('c', "
                    f"{str(ROOT / 'configs' / (name + '.py'))!r})\nm = importlib.util.module_from_spec(spec)\n"
                    f"spec.loader.exec_module(m)\n\n\ndef get_config():\n    c = m.get_config()\n{body}    return c\n")
    return path


@pytest.mark.slow
def test_la_ablations_study_end_to_end(tmp_path):
    """Two variants on two images of the tiny model: the report compares them with the default, and a
    rerun of the same command computes nothing (the engine's store is the study's cache)."""
    config = _smoke_config(tmp_path, "la_ablations", (
        "    c.variants = {'default': {}, 's5': {'spatial_range': 5.0}, 'untargeted': {'strategy': 'untargeted'}}\n"
        "    c.questions = {'Spatial range': ['s5', 'default'], 'Strategy': ['default', 'untargeted']}\n"
        "    c.question_order = ('Spatial range', 'Strategy')\n"
        "    c.pairs = (('untargeted', 's5'),)\n"
        "    c.model = 'tiny_cnn'; c.data = 'samples'; c.num_images = 2; c.stride = 1; c.batch_size = 2\n"
        "    c.reproduction = ''\n"))
    first = _cli("experiments.la_ablations", config, tmp_path, "--progress=false")
    assert first.returncode == 0, first.stderr[-3000:]
    report = (tmp_path / "results" / "LA_ABLATIONS.md").read_text()
    assert "## Spatial range" in report and "`la@s5`" in report and "`la@untargeted`" in report
    assert report.index("## Spatial range") < report.index("## Strategy") < report.index("## Direct comparisons")
    assert "| `untargeted` − `s5` | la | 2 |" in report
    summary = json.loads((tmp_path / "results" / "la_ablations" / "cpu_quick_64" / "summary.json").read_text())
    assert summary["resolved"]["methods"]["la@untargeted"]["strategy"] == "untargeted"
    again = _cli("experiments.la_ablations", config, tmp_path, "--progress=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "maps of" not in again.stderr and "all 2 images already done" in again.stderr


@pytest.mark.slow
def test_iprop_tuning_study_end_to_end(tmp_path):
    """A two-point grid on the tiny model: the report and JSON are written, every setting is a named IProp
    variant of the tuning run, and a rerun computes nothing."""
    config = _smoke_config(tmp_path, "iprop_tuning_rise", (
        "    c.model = 'tiny_cnn'; c.data = 'samples'; c.methods = ('sm', 'ig'); c.heldout_methods = ('sm',)\n"
        "    c.batch_size = 3; c.tune = {'start': 0, 'stride': 1, 'num_images': 3}\n"
        "    c.heldout = {'start': 3, 'stride': 1, 'num_images': 3}\n"
        "    c.grid = {'k': [4], 'radius': [1], 'gamma': [0.5, 0.9], 'sigma_c': [0.1], 'color_space': ['rgb'],\n"
        "              'reward': ['sum']}\n"
        "    c.tune_protocol = 'rise_every2'\n"))
    searched = _cli("experiments.iprop_tuning", config, tmp_path, "--tune_only")
    assert searched.returncode == 0, searched.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "iprop_tuning_rise.json").read_text())["heldout"] is None
    assert "## Held-out split: pending" in (tmp_path / "results" / "iprop_tuning_rise.md").read_text()
    assert not (tmp_path / "runs" / "iprop_tuning_rise_heldout").exists()
    first = _cli("experiments.iprop_tuning", config, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "iprop_tuning_rise.json").read_text())
    assert record["tuning"]["criterion"] == "dir"
    assert len(record["tuning"]["settings"]) == 2 and record["tuning"]["chosen"]["gamma"] in (0.5, 0.9)
    assert set(record["heldout"]) == {"sm"}
    tune_run = tmp_path / "runs" / "iprop_tuning_rise_tune" / "batches"
    named = sorted(p.name for p in tune_run.iterdir() if "+iprop@" in p.name)
    assert len(named) == 2 * (2 + 3)  # 2 methods x (2 settings + the 3 reward rules' gamma = 0 controls)
    stored = json.loads((tune_run / named[0] / "iprop.json").read_text())
    assert stored == IPropConfig(**stored).as_dict()
    again = _cli("experiments.iprop_tuning", config, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "to compute" not in again.stderr


def test_iprop_questions_parts_are_engine_runs_with_named_iprop_variants(tmp_path):
    """Each control is the preset with one change; each corruption is its own run (the corruption is part of
    its identity); bad parts and a control named like the KNN graph are one-line errors."""
    from configs.iprop_questions import get_config
    from la_iprop.iprop import preset_hparams
    from la_iprop.studies.iprop_questions import KNN, part_configs

    study = get_config().to_dict()
    configs = part_configs(study, tmp_path)
    assert list(configs) == ["structure", "ood_gaussian_noise_3", "ood_defocus_blur_3", "ood_jpeg_compression_3",
                             "ood_contrast_3"]
    structure = configs["structure"]
    preset = preset_hparams(study["iprop_preset"])
    assert structure.iprop_variants[KNN] == preset and not structure.iprop
    assert structure.iprop_variants["random_image"] == {**preset, "graph": "random_image"}
    assert "sm+iprop@spatial" in method_variants(structure)
    ood = configs["ood_contrast_3"]
    assert ood.corruption == "contrast:3" and ood.identity()["corruption"] == "contrast:3"
    assert method_variants(ood)[-1] == "agi+iprop@la" and ood.out.endswith("iprop_questions_cpu_quick_64_ood_contrast_3")
    with pytest.raises(ConfigError, match="parts: unknown part"):
        part_configs(study, tmp_path, ("structure", "nope"))
    with pytest.raises(ConfigError, match="controls: 'knn'"):
        part_configs({**study, "controls": {KNN: {"gamma": 0.5}}}, tmp_path)


@pytest.mark.slow
def test_iprop_questions_study_end_to_end(tmp_path):
    """The structure part and one corruption on two images of the tiny model: the report has a table per
    part and protocol, the interim report of an unbegun part says so, and a rerun computes nothing."""
    config = _smoke_config(tmp_path, "iprop_questions", (
        "    c.model = 'tiny_cnn'; c.data = 'samples'; c.num_images = 2; c.stride = 1; c.batch_size = 2\n"
        "    c.controls = {'random_window': {'graph': 'random_window'}, 'spatial': {'similarity': 'spatial'}}\n"
        "    c.structure_methods = ('sm',); c.ood_methods = ('sm', 'la'); c.corruptions = ('contrast:3',)\n"
        "    c.reproduction = ''; c.tuning_report = ''\n"))
    interim = _cli("experiments.iprop_questions", config, tmp_path, "--interim", "--progress=false")
    assert interim.returncode == 0, interim.stderr[-3000:]
    assert "**Structure controls**: not begun yet" in (tmp_path / "results" / "IPROP_QUESTIONS.md").read_text()
    first = _cli("experiments.iprop_questions", config, tmp_path, "--progress=false")
    assert first.returncode == 0, first.stderr[-3000:]
    report = (tmp_path / "results" / "IPROP_QUESTIONS.md").read_text()
    for text in ("`sm+iprop@random_window` (vs `sm+iprop@knn`)", "`sm+iprop@knn` (vs `sm`)", "### `contrast:3`",
                 "`la+iprop@la` (vs `la`)", "**Structure controls, `rise`** (2 images)", "structure.png"):
        assert text in report, text
    section = tmp_path / "results" / "iprop_questions" / "cpu_quick_64"
    summary = json.loads((section / "ood_contrast_3" / "summary.json").read_text())
    assert summary["flags"]["corruption"] == "contrast:3"
    again = _cli("experiments.iprop_questions", config, tmp_path, "--progress=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "to compute" not in again.stderr


@pytest.mark.parametrize("changes, match", [
    ({"metric_precision": "float16"}, "metric_precision: must be None"),
    ({"nudge_ulps": -1}, r"nudge_ulps: must be an integer in \[0, 65536\]"),
    ({"nudge_ulps": True}, "nudge_ulps: must be an integer"),
    ({"nudge_ulps": 1, "precision": "float64"}, "nudge_ulps: moves the images by float32 ulps"),
])
def test_stability_probes_refuse_bad_values(changes, match):
    with pytest.raises(ConfigError, match=match):
        validate(RunConfig(methods=("sm",), model="efficientnet_lite0", out="unused", **changes))


def test_stability_probes_enter_the_identity_only_when_set():
    plain = RunConfig(methods=("sm",), out="unused").identity()
    assert "nudge_ulps" not in plain and "metric_precision" not in plain  # older run folders keep their identity
    probed = RunConfig(methods=("sm",), out="unused", nudge_ulps=1, metric_precision="float32").identity()
    assert probed["nudge_ulps"] == 1 and probed["metric_precision"] == "float32"


def test_iprop_questions_report_reads_a_search_without_its_held_out_test(tmp_path):
    """A rise tuning JSON written with ``--tune_only`` (held-out pending) gives the chosen setting and says the
    held-out test is pending; parts not begun say so."""
    from configs.iprop_questions import get_config
    from la_iprop.iprop import IPropConfig
    from la_iprop.studies.iprop_questions_report import write_report

    study = get_config().to_dict()
    chosen = IPropConfig(gamma=0.9, k=8).as_dict()
    (tmp_path / study["tuning_report"]).write_text(json.dumps(
        {"command": "python -m experiments.iprop_tuning --config=configs/iprop_tuning_rise.py", "heldout": None,
         "tuning": {"chosen": chosen, "criterion": "dir"}}))
    text = write_report(tmp_path, study, "python -m experiments.iprop_questions").read_text()
    assert "k=8, R=2, γ=0.9" in text and "The held-out test is pending" in text
    assert "**Structure controls**: not begun yet" in text and "**Corruption `contrast:3`**: not begun yet" in text
