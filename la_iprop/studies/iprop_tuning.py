"""IProp's settings chosen by measurement, as a study on the run engine.

Two engine runs, one per split (tuning, held-out), each computing the methods' maps once. Every
IProp setting the search scores is added to the tuning run as a named IProp variant
(``METHOD+iprop@LABEL``, :attr:`la_iprop.runs.config.RunConfig.iprop_variants`): the engine
propagates the stored maps and scores them, and its store is the only cache (an interrupted
search resumes from the settings already scored). The searches themselves are
:func:`la_iprop.iprop.tuning.search` (the full grid, or coordinate ascent from the defaults).

- Score of a setting: the mean over methods of the criterion on the tuning split, ``ins_minus_del``
  (higher is better) or ``dir`` (deletion / insertion, lower is better; the IProp paper's kind of
  figure), each from the AUCs of the mean curves, under the tuning protocol (usually the study's
  protocol sampled at every k-th point, ``PRESET_every<k>``: k times cheaper).
- The gamma = 0 control of every reward rule is scored too: the gain of aggregating channels
  into a per-pixel map, without propagation.
- Held-out split, under the study's protocol itself: each method raw, + the control (gamma 0, the
  chosen reward rule) and + IProp (the chosen setting), with paired 95% bootstrap CIs of IProp's
  gain over the raw map and over the control in ins − del and dir, and verdicts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from la_iprop.iprop import IPROP_SUFFIX, REWARD_RULES, IPropConfig
from la_iprop.iprop.tuning import GRID, search, setting_key
from la_iprop.metrics.comparison import Scores, compare
from la_iprop.runs.config import VARIANT_SEPARATOR, RunConfig
from la_iprop.runs.engine import run
from la_iprop.runs.report import summarize_variant
from la_iprop.runs.store import load_records

__all__ = ["CRITERIA", "Tuner", "variant_label", "tune", "held_out", "criterion_score"]

CRITERIA = {"ins_minus_del": 1, "dir": -1}  # the criterion and the sign of "better"


def variant_label(config: IPropConfig) -> str:
    """The engine label of an IProp setting (its cache key as letters, digits and _)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", setting_key(config)).strip("_")


def criterion_score(per_method: Mapping[str, Mapping[str, float]], criterion: str) -> float:
    """The mean over methods of ``criterion``, signed so that higher is better."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    return CRITERIA[criterion] * float(np.mean([s[criterion] for s in per_method.values()]))


class Tuner:
    """Scores of IProp settings on one split: the engine run ``base`` (the methods' maps, stored once),
    to which each scored setting is added as a named IProp variant."""

    def __init__(self, base: RunConfig, *, model=None, progress: bool = False):
        if len(base.protocols) != 1:
            raise ValueError(f"a tuning run scores under one protocol, got {base.protocols}")
        self.base, self.model, self.progress = base, model, progress
        self.protocol = base.protocols[0]
        self.computed = 0  # engine runs that had something new to score

    def variant(self, method: str, config: IPropConfig | None) -> str:
        return method if config is None else f"{method}{IPROP_SUFFIX}{VARIANT_SEPARATOR}{variant_label(config)}"

    def ensure(self, configs: Iterable[IPropConfig | None]) -> None:
        """Runs (or resumes) the split's run with the settings ``configs`` added (the raw maps always)."""
        labels = {variant_label(c): c.as_dict() for c in configs if c is not None}
        missing = [m for m in self.base.methods for c in [None, *labels] if load_records(
            self.base.out, m if c is None else f"{m}{IPROP_SUFFIX}{VARIANT_SEPARATOR}{c}", self.protocol) is None]
        if missing or not labels:
            run(dataclasses.replace(self.base, iprop_variants=labels), progress=self.progress, model=self.model,
                reports=False)
            self.computed += bool(missing)

    def records(self, method: str, config: IPropConfig | None) -> dict[str, np.ndarray]:
        records = load_records(self.base.out, self.variant(method, config), self.protocol)
        if records is None:
            raise RuntimeError(f"{self.variant(method, config)}: no scores in {self.base.out} (run ensure first)")
        return records

    def setting_score(self, config: IPropConfig | None, criterion: str) -> dict[str, Any]:
        """``{"config", "per_method", "score"}`` of a setting (None: the raw maps)."""
        self.ensure([config])
        per_method = {m: summarize_variant(self.records(m, config)) for m in self.base.methods}
        return {"config": None if config is None else config.as_dict(), "per_method": per_method,
                "score": criterion_score(per_method, criterion)}


def tune(tuner: Tuner, grid: Mapping[str, Sequence], mode: str, criterion: str, max_passes: int = 3) -> dict:
    """The search on the tuning split: every setting scored, the raw maps, the gamma = 0 controls,
    and the chosen setting (the best score)."""
    raw = tuner.setting_score(None, criterion)
    controls = {rule: tuner.setting_score(IPropConfig(gamma=0.0, reward=rule), criterion) for rule in REWARD_RULES}
    results = search(lambda config: tuner.setting_score(config, criterion), dict(grid), mode, max_passes)
    best = max(results.values(), key=lambda r: r["score"])
    return {"raw": raw, "controls": controls, "settings": results, "chosen": best["config"], "criterion": criterion}


def _scores(records: Mapping[str, np.ndarray]) -> Scores:
    return Scores(records["index"], records["insertion"], records["deletion"])


def held_out(tuner: Tuner, chosen: Mapping[str, Any]) -> dict[str, dict]:
    """Per method on the held-out split: raw, + control, + IProp summaries, and IProp's paired gains
    (ins − del, dir) over the raw map and over the control, with verdicts."""
    setting = IPropConfig(**chosen)
    control = IPropConfig(gamma=0.0, reward=setting.reward)
    tuner.ensure([setting, control])
    out = {}
    for method in tuner.base.methods:
        records = {"raw": tuner.records(method, None), "ctrl": tuner.records(method, control),
                   "iprop": tuner.records(method, setting)}
        rows = {name: summarize_variant(r) for name, r in records.items()}
        scores = {name: _scores(r) for name, r in records.items()}
        for name, against in (("vs_raw", "raw"), ("vs_ctrl", "ctrl")):
            comparison = compare(scores["iprop"], scores[against])
            rows["iprop"][name] = {metric: {**comparison.differences[metric].to_dict(),
                                            "verdict": comparison.verdicts[metric]}
                                   for metric in ("ins_minus_del", "dir")}
        comparison = compare(scores["ctrl"], scores["raw"])
        rows["ctrl"]["vs_raw"] = {metric: {**comparison.differences[metric].to_dict(),
                                           "verdict": comparison.verdicts[metric]}
                                  for metric in ("ins_minus_del", "dir")}
        out[method] = rows
    return out


def grid_from(overrides: Mapping[str, Sequence] | None) -> dict[str, tuple]:
    """The ablation grid with some axes replaced (smoke runs); unknown axes are an error."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(GRID))
    if unknown:
        raise ValueError(f"grid: unknown axes {unknown}; axes: {list(GRID)}")
    empty = sorted(k for k, v in overrides.items() if not v)
    if empty:
        raise ValueError(f"grid: axes {empty} have no values")
    return {**GRID, **{k: tuple(v) for k, v in overrides.items()}}
