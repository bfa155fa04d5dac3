"""IProp ablation: which graph / propagation settings help which attribution methods.

    python -m experiments.iprop_ablation --methods=sm,ig,la
    python -m experiments.iprop_ablation --methods=sm,ig,la --protocol=rise --out=results/iprop_ablation_rise.md
    python -m experiments.iprop_ablation --methods=sm --tune=0:4 --heldout=800:804 --settings=quick \\
        --search=coordinate --cache=/tmp/ablation --out=/tmp/ablation.md          # a smoke run

1. Each method's maps are computed once per split (tuning: la1000 0-199, held-out: 800-999)
   and cached per batch under ``--cache``; an interrupted run resumes, a rerun is cheap.
2. IProp settings from the grid ``k x radius x gamma x sigma_c x color_space x reward``
   (``--search=full``: every valid combination; ``coordinate``: coordinate ascent from the
   library defaults, one axis at a time, until a full pass changes nothing) are scored on
   the tuning split with the ``la`` insertion/deletion protocol (``--protocol=rise``: RISE's,
   per pixel, the IProp paper's kind of evaluation). Per-image AUCs of each
   (method, setting) are cached too. The score of a setting is the mean over methods of
   ``ins - del`` (AUC of the mean curve), so one default is chosen for all methods.
3. The ``gamma = 0`` control (same reward rule, no propagation) is scored for every reward
   rule, separating the gain of propagation from that of channel aggregation.
4. On the held-out split: method, method + control (gamma 0, chosen reward rule) and method
   + IProp (chosen setting): insertion, deletion, ins - del, dir. Written to ``--out``
   (Markdown, with the command that regenerates it) and a JSON next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from la_iprop.iprop import REWARD_RULES, IPropConfig, iprop
from la_iprop.iprop.tuning import GRID, RAW, coarse_points, search, setting_key
from la_iprop.metrics import auc, get_protocol
from la_iprop.metrics.statistics import MeanCI, paired_difference_ci, verdict
from la_iprop.models import predict
from la_iprop.runs.config import REFERENCE_SET_SIZE, image_keys
from la_iprop.runs.store import atomic_write, write_json, write_npz

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = "la1000:" + str(ROOT.parent / "shared" / "data" / "la1000")

PROTOCOL_TEXT = {  # how the report describes the protocol it tuned and tested with
    "la": "official LA/MFABA evaluation: softmax probability of the clean top-1 class, all H·W·3 elements ranked, "
          "3·224 per step, black substrate; AUC of the mean curve",
    "rise": "RISE/IProp evaluation: softmax probability of the clean top-1 class, pixels ranked by the channel-summed "
            "map, 224 per step, insertion from a blurred image, deletion to the mean colour; AUC of the mean curve",
}


# ----------------------------------------------------------------------------- caching
@dataclasses.dataclass
class Split:
    name: str
    indices: np.ndarray
    images: np.ndarray       # [n, H, W, 3]
    predicted: np.ndarray    # [n] the explained class: top-1 on the clean image

    @property
    def tag(self) -> str:
        stride = int(self.indices[1] - self.indices[0]) if len(self.indices) > 1 else 1
        return f"{self.name}_{int(self.indices[0])}-{int(self.indices[-1]) + 1}" + (f"s{stride}" if stride > 1 else "")


class Ablation:
    """Maps and scores with an on-disk cache; every expensive result is computed once."""

    def __init__(self, args: argparse.Namespace):
        from la_iprop.data import open_source
        from la_iprop.models import load_model

        self.args = args
        self.protocol = args.protocol
        self.step = get_protocol(args.protocol).step  # units per step of the protocol itself
        self.model = load_model(args.model)
        self.source = open_source(args.data, size=self.model.input_size)
        self.cache = pathlib.Path(args.cache) / args.model / args.settings
        reference = range(min(REFERENCE_SET_SIZE, len(self.source)))  # as the experiment runner
        self.reference_images = np.asarray(self.source.load(reference).images)
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        self._method_dirs: dict[str, str] = {}
        self.evaluated = 0
        self.cache_hits = 0

    # -------------------------------------------------------------------- data
    def split(self, name: str, start: int, stop: int, stride: int = 1) -> Split:
        if not 0 <= start < stop <= len(self.source):
            raise ValueError(f"--{name}: need 0 <= start < stop <= {len(self.source)}, got {start}:{stop}")
        indices = np.arange(start, stop, stride)
        images = np.asarray(self.source.load(indices).images, np.float32)
        predicted = np.concatenate([np.asarray(_PREDICT(self.model, jnp.asarray(images[i:i + 32])))
                                    for i in range(0, len(images), 32)])
        return Split(name, indices, images, predicted)

    def method_hparams(self, method: str) -> dict[str, Any]:
        """The method's keyword hyperparameters for this run (registry defaults, quick overrides)."""
        from la_iprop.attribution import get_method, method_hparams
        return {**method_hparams(method), **get_method(method).settings_hparams(self.args.settings)}

    def method_dir(self, method: str) -> str:
        """``<method>-<hash of its hyperparameters>``: a changed default never reuses stale maps or scores."""
        if method not in self._method_dirs:
            text = json.dumps({k: v for k, v in self.method_hparams(method).items() if k != "reference_images"},
                              sort_keys=True, default=repr)
            self._method_dirs[method] = f"{method}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
        return self._method_dirs[method]

    # -------------------------------------------------------------------- maps
    def maps(self, method: str, split: Split) -> np.ndarray:
        """The method's attributions for the split, computed per batch and cached (resumable)."""
        if (method, split.tag) in self._maps:
            return self._maps[(method, split.tag)]
        from la_iprop.attribution import get_method

        spec = get_method(method)
        hparams = spec.settings_hparams(self.args.settings)
        if spec.needs_reference_set:
            hparams["reference_images"] = self.reference_images
        out = []
        bs = self.args.batch_size
        for i in range(0, len(split.indices), bs):
            idx = split.indices[i:i + bs]
            path = self.cache / "maps" / self.method_dir(method) / f"{int(idx[0])}-{int(idx[-1]) + 1}.npz"
            if path.exists():
                with np.load(path) as f:
                    if np.array_equal(f["index"], idx) and np.array_equal(f["predicted"], split.predicted[i:i + bs]):
                        out.append(f["attribution"])
                        continue
            started = time.perf_counter()
            keys = image_keys(self.args.seed, idx)
            maps = spec.fn(self.model, jnp.asarray(split.images[i:i + bs]), jnp.asarray(split.predicted[i:i + bs]),
                           key=keys, **hparams)
            maps = np.asarray(jax.block_until_ready(maps), np.float32)
            seconds = time.perf_counter() - started
            _log(f"{method}: maps {int(idx[0])}-{int(idx[-1]) + 1} in {seconds:.1f}s "
                 f"({len(idx) / max(seconds, 1e-9):.3g} images/s)")
            write_npz(path, {"index": idx, "predicted": split.predicted[i:i + bs], "attribution": maps})
            out.append(maps)
        maps = np.concatenate(out)
        self._maps[(method, split.tag)] = maps
        return maps

    # -------------------------------------------------------------------- scores
    def score_path(self, method: str, split: Split, config: IPropConfig | None, step: int) -> pathlib.Path:
        protocol = "" if self.protocol == "la" else self.protocol  # (la's paths are those of older caches)
        coarse = "" if step == self.step else f"step{step}"
        return (self.cache / "scores" / split.tag / protocol / coarse / self.method_dir(method)
                / f"{setting_key(config)}.npz")

    def scores(self, method: str, split: Split, config: IPropConfig | None, step: int | None = None) -> dict[str, Any]:
        """Per-image insertion/deletion AUCs (the run's protocol, ``step`` units per step; default: the
        protocol's own) of method (+ IProp with ``config``)."""
        step = step or self.step
        from la_iprop.metrics import evaluate

        path = self.score_path(method, split, config, step)
        if path.exists():
            with np.load(path) as f:
                if np.array_equal(f["index"], split.indices):
                    self.cache_hits += 1
                    return _summary(f["insertion"], f["deletion"], float(f["iterations"]))
        maps = self.maps(method, split)
        protocol = get_protocol(self.protocol, step=step)
        started = time.perf_counter()
        ins, dele, iterations, ins_curves, del_curves = [], [], [], [], []
        bs = self.args.batch_size
        for i in range(0, len(split.indices), bs):
            images = jnp.asarray(split.images[i:i + bs])
            attributions = jnp.asarray(maps[i:i + bs])
            if config is not None:
                values, its = iprop(images, attributions, config=config, return_iterations=True)
                attributions = jnp.broadcast_to(values[..., None], images.shape)
                iterations.append(np.asarray(its))
            game = evaluate(self.model, images, attributions, protocol=protocol, labels=split.predicted[i:i + bs])
            ins.append(game.insertion_aucs)
            dele.append(game.deletion_aucs)
            ins_curves.append(game.insertion_curves)
            del_curves.append(game.deletion_curves)
        seconds = time.perf_counter() - started
        ins, dele = np.concatenate(ins), np.concatenate(dele)
        mean_its = float(np.concatenate(iterations).mean()) if iterations else 0.0
        write_npz(path, {"index": split.indices, "insertion": ins, "deletion": dele, "iterations": mean_its,
                         "insertion_curves": np.concatenate(ins_curves),
                         "deletion_curves": np.concatenate(del_curves)})
        self.evaluated += 1
        summary = _summary(ins, dele, mean_its)
        _log(f"{method} {setting_key(config)} [{split.tag}]: ins {summary['insertion']:.4f} "
             f"del {summary['deletion']:.4f} ins-del {summary['ins_minus_del']:.4f} "
             f"({seconds:.0f}s, {len(ins) / max(seconds, 1e-9):.3g} images/s)")
        return summary

    def curves(self, method: str, split: Split, config: IPropConfig | None) -> tuple[np.ndarray, np.ndarray]:
        """The per-image insertion and deletion curves of a variant scored with the run's protocol."""
        path = self.score_path(method, split, config, self.step)
        if not path.exists():
            self.scores(method, split, config)
        with np.load(path) as f:
            return f["insertion_curves"], f["deletion_curves"]

    def setting_score(self, methods: Iterable[str], split: Split, config: IPropConfig | None,
                      step: int | None = None) -> dict[str, Any]:
        per_method = {m: self.scores(m, split, config, step) for m in methods}
        return {"config": None if config is None else config.as_dict(), "per_method": per_method,
                "score": float(np.mean([s["ins_minus_del"] for s in per_method.values()]))}


def _summary(ins: np.ndarray, dele: np.ndarray, iterations: float) -> dict[str, Any]:
    # AUC of the mean curve == mean of the per-image AUCs (the AUC is linear in the curve).
    i, d = float(np.mean(ins)), float(np.mean(dele))
    return {"insertion": i, "deletion": d, "ins_minus_del": i - d, "dir": d / i if i else float("inf"),
            "num_images": int(len(ins)), "mean_iterations": iterations}


_PREDICT = jax.jit(predict)  # the explained class: top-1 on the clean image, as in the runner


def _log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- statistics
def add_paired_statistics(ablation: Ablation, split: Split, variants: dict[str, IPropConfig | None],
                          held: dict[str, dict[str, dict]], coarse: int) -> None:
    """Adds to each held-out record the paired 95% bootstrap CI of the per-image gain in ins - del
    over the raw map (same images), and the ins - del of the same curves sampled at every
    ``coarse``-th point, i.e. what the tuning protocol would have scored."""
    for method, rows in held.items():
        per_image = {}
        for name, config in variants.items():
            ins, dele = ablation.curves(method, split, config)
            per_image[name] = auc(ins) - auc(dele)
            points = coarse_points(ins.shape[1], coarse)
            rows[name]["ins_minus_del_tuning_protocol"] = float(np.mean(auc(ins[:, points]) - auc(dele[:, points])))
        for name in variants:
            if name != RAW:
                rows[name]["gain_vs_raw_ci"] = paired_difference_ci(per_image[name], per_image[RAW]).to_dict()
        if "ctrl" in per_image and "iprop" in per_image:
            rows["iprop"]["gain_vs_ctrl_ci"] = paired_difference_ci(per_image["iprop"], per_image["ctrl"]).to_dict()


# ----------------------------------------------------------------------------- report
def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _ci_text(ci: dict[str, Any]) -> str:
    return f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]"


def _verdict_text(ci: dict[str, Any]) -> str:
    return verdict(MeanCI(**ci))


def _setting_text(config: dict[str, Any] | None) -> str:
    if config is None:
        return "raw map"
    return (f"k={config['k']} R={config['radius']} γ={config['gamma']:g} σ_c={config['sigma_c']:g} "
            f"{config['color_space']} {config['reward']}")


def write_report(path: pathlib.Path, *, command: str, args: argparse.Namespace, methods: list[str],
                 chosen: dict[str, Any], results: dict[str, dict], raw_tune: dict, controls_tune: dict[str, dict],
                 heldout: dict[str, dict[str, dict]], env: dict, protocol: dict, elapsed: float) -> str:
    ranked = sorted(results.values(), key=lambda r: r["score"], reverse=True)
    unit = "elements" if protocol["ranking"] == "element" else "pixels"
    lines = [
        "# IProp ablation",
        "",
        f"Regenerate with (from the repository root): `{command}`",
        "",
        f"Model `{args.model}`, data `{args.data}`, method settings `{args.settings}`, seed {args.seed}. "
        f"Protocol `{args.protocol}` ({PROTOCOL_TEXT[args.protocol]}). IProp maps are per pixel, "
        f"broadcast to the 3 channels. Tuning split: images {args.tune}; held-out split: images {args.heldout}. "
        f"Search `{args.search}` over {json.dumps({k: list(v) for k, v in args.grid.items()})} "
        f"(σ_s, tol, max_iter at the library defaults): {len(results)} settings evaluated. "
        f"Score of a setting: mean over methods ({', '.join(methods)}) of ins − del on the tuning split"
        + ("." if args.tune_step == protocol["step"] else
           f", scored with protocol `{args.protocol}` coarsened to {args.tune_step} {unit} per step (the "
           f"`{args.protocol}` curve sampled at every {args.tune_step // protocol['step']}th point, "
           f"{args.tune_step // protocol['step']}× cheaper); the held-out split uses protocol `{args.protocol}` "
           f"itself, and its last column shows what the coarsened protocol gives on the same curves."),
        "",
        f"Environment: jax {env['jax']} ({env['backend']}, {env['device']}), python {env['python']}; "
        f"{datetime.date.today()}; wall time {elapsed / 60:.1f} min this run "
        f"({env['evaluated']} (method, setting) evaluations computed, {env['cache_hits']} from the cache).",
        "",
        "## Chosen defaults (best mean ins − del on the tuning split)",
        "",
        "| k | radius | γ | σ_c | colour space | reward | σ_s | tol | max_iter |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {chosen['k']} | {chosen['radius']} | {chosen['gamma']:g} | {chosen['sigma_c']:g} | "
        f"{chosen['color_space']} | {chosen['reward']} | {chosen['sigma_s']:g} | {chosen['tol']:g} | "
        f"{chosen['max_iter']} |",
        "",
        "To adopt them, set in `la_iprop/iprop/defaults.py`: " + ", ".join(
            f"`DEFAULT_{name.upper()} = {chosen[name]!r}`" for name in GRID) + ".",
        "",
        "## Held-out split: method vs method + IProp",
        "",
        "`+ctrl` is the γ = 0 control: the chosen reward rule (channel aggregation) without propagation.",
        "",
        "The gain is the mean per-image difference in ins − del over the raw map with its paired 95% bootstrap CI "
        "(same images).",
        "",
        "| method | variant | insertion ↑ | deletion ↓ | ins − del ↑ | gain vs raw | dir ↓ | ins − del, tuning protocol |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for method in methods:
        rows = heldout[method]
        for variant in ("raw", "ctrl", "iprop"):
            r = rows[variant]
            name = {"raw": method, "ctrl": f"{method}+ctrl", "iprop": f"{method}+iprop"}[variant]
            gain_text = "—" if variant == "raw" else _ci_text(r["gain_vs_raw_ci"])
            lines.append(f"| {method} | {name} | {_fmt(r['insertion'])} | {_fmt(r['deletion'])} | "
                         f"{_fmt(r['ins_minus_del'])} | {gain_text} | {_fmt(r['dir'])} | "
                         f"{_fmt(r['ins_minus_del_tuning_protocol'])} |")
        vs_raw, vs_ctrl = rows["iprop"]["gain_vs_raw_ci"], rows["iprop"]["gain_vs_ctrl_ci"]
        verdicts.append(f"- **{method}** ({vs_raw['n']} images): IProp raises ins − del over the raw map: "
                        f"{_verdict_text(vs_raw)} ({_ci_text(vs_raw)}); over the γ = 0 control (propagation itself): "
                        f"{_verdict_text(vs_ctrl)} ({_ci_text(vs_ctrl)}).")
    lines += ["", "Verdict on the held-out split:", "", *verdicts, ""]

    lines += ["## Tuning split: γ = 0 controls and raw maps", "",
              "| reward rule | " + " | ".join(f"{m} ins − del" for m in methods) + " | mean |",
              "|---|" + "---|" * (len(methods) + 1)]
    lines.append("| raw map | " + " | ".join(_fmt(raw_tune["per_method"][m]["ins_minus_del"]) for m in methods)
                 + f" | {_fmt(raw_tune['score'])} |")
    for rule, rec in controls_tune.items():
        lines.append(f"| γ = 0, {rule} | " + " | ".join(_fmt(rec["per_method"][m]["ins_minus_del"]) for m in methods)
                     + f" | {_fmt(rec['score'])} |")

    top = ranked[: args.report_top]
    lines += ["", f"## Tuning split: the {len(top)} best settings", "",
              "| setting | " + " | ".join(f"{m} ins − del" for m in methods) + " | mean | iterations |",
              "|---|" + "---|" * (len(methods) + 2)]
    for rec in top:
        its = np.mean([rec["per_method"][m]["mean_iterations"] for m in methods])
        lines.append(f"| {_setting_text(rec['config'])} | "
                     + " | ".join(_fmt(rec["per_method"][m]["ins_minus_del"]) for m in methods)
                     + f" | {_fmt(rec['score'])} | {its:.0f} |")

    lines += ["", "## Tuning split: best mean ins − del per value of each axis (over the settings evaluated)", "",
              "| axis | value | best mean ins − del | settings |", "|---|---|---|---|"]
    for axis, values in args.grid.items():
        for value in values:
            matching = [r["score"] for r in results.values() if r["config"][axis] == value]
            if matching:
                lines.append(f"| {axis} | {value} | {_fmt(max(matching))} | {len(matching)} |")
    lines += ["", "Protocol record: `" + json.dumps(protocol, default=str) + "`", ""]
    text = "\n".join(lines)
    atomic_write(path, lambda f: f.write(text))
    return text


# ----------------------------------------------------------------------------- main
def _range(text: str) -> tuple[int, int, int]:
    try:
        values = [int(v) for v in text.split(":")]
        if len(values) not in (2, 3) or (len(values) == 3 and values[2] < 1):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP or START:STOP:STRIDE (stop exclusive, stride >= 1), "
                                         f"got {text!r}") from None
    return (*values, 1)[:3]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sm,ig,la", help="registered methods, comma separated")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--data", default=DEFAULT_DATA, help="image source spec (la1000:PATH)")
    p.add_argument("--tune", type=_range, default=(0, 200, 1), help="tuning split START:STOP[:STRIDE]")
    p.add_argument("--heldout", type=_range, default=(800, 1000, 1), help="held-out split START:STOP[:STRIDE]")
    p.add_argument("--settings", choices=("paper", "quick"), default="paper",
                   help="method hyperparameters: the defaults (paper) or the cheap CPU ones (quick)")
    p.add_argument("--search", choices=("full", "coordinate"), default="coordinate",
                   help="full: every valid grid point; coordinate: ascent one axis at a time from the defaults")
    p.add_argument("--max_passes", type=int, default=3, help="coordinate search: passes over the axes at most")
    p.add_argument("--grid", type=json.loads, default={},
                   help='JSON replacing some axes of the grid, e.g. \'{"gamma": [0.5, 0.9]}\' (smoke runs)')
    p.add_argument("--protocol", choices=tuple(PROTOCOL_TEXT), default="la",
                   help="insertion/deletion protocol of the tuning and the held-out scores (README, docs/design.md)")
    p.add_argument("--tune_step", type=int, default=None,
                   help="units (la: elements, rise: pixels) per insertion/deletion step on the tuning split: a "
                        "multiple k of the protocol's step (la 672, rise 224), which samples its curve at every "
                        "k-th point (k times cheaper); default: the protocol's step")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(ROOT / "runs" / "iprop_ablation"))
    p.add_argument("--out", default=str(ROOT / "results" / "iprop_ablation.md"))
    p.add_argument("--report_top", type=int, default=15)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.grid) - set(GRID))
    if unknown:
        p.error(f"--grid: unknown axes {unknown}; axes: {list(GRID)}")
    args.grid = {**GRID, **{k: tuple(v) for k, v in args.grid.items()}}
    base_step = get_protocol(args.protocol).step
    args.tune_step = base_step if args.tune_step is None else args.tune_step
    if args.tune_step < 1 or args.tune_step % base_step:
        p.error(f"--tune_step: expected a positive multiple of {base_step} (protocol {args.protocol}'s step), "
                f"got {args.tune_step}")
    args.tune_range, args.heldout_range = args.tune, args.heldout
    args.tune, args.heldout = (_range_text(r) for r in (args.tune, args.heldout))
    return args


def _range_text(r: tuple[int, int, int]) -> str:
    start, stop, stride = r
    count = len(range(start, stop, stride))
    return f"{start}–{stop - 1}" + (f" in steps of {stride} ({count} images)" if stride > 1 else f" ({count} images)")


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    command = "python -m experiments.iprop_ablation " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    args = parse_args(argv)
    from la_iprop.attribution import available_methods
    unknown = [m for m in args.methods if m not in available_methods()]
    if unknown or not args.methods:
        raise SystemExit(f"--methods: unknown {unknown}; available: {', '.join(available_methods())}")

    ablation = Ablation(args)
    tune = ablation.split("tune", *args.tune_range)
    heldout = ablation.split("heldout", *args.heldout_range)

    step = args.tune_step
    raw_tune = ablation.setting_score(args.methods, tune, None, step)
    controls_tune = {rule: ablation.setting_score(args.methods, tune, IPropConfig(gamma=0.0, reward=rule), step)
                     for rule in REWARD_RULES}
    results = search(lambda config: ablation.setting_score(args.methods, tune, config, step), args.grid,
                     args.search, args.max_passes)
    best = max(results.values(), key=lambda r: r["score"])
    chosen = best["config"]
    chosen_config = IPropConfig(**chosen)
    control = IPropConfig(gamma=0.0, reward=chosen["reward"])

    variants = {"raw": None, "ctrl": control, "iprop": chosen_config}
    held = {m: {name: ablation.scores(m, heldout, config) for name, config in variants.items()} for m in args.methods}
    add_paired_statistics(ablation, heldout, variants, held, coarse=step // ablation.step)

    device = jax.devices()[0]
    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "device": getattr(device, "device_kind", str(device)), "python": platform.python_version(),
           "evaluated": ablation.evaluated, "cache_hits": ablation.cache_hits}
    elapsed = time.perf_counter() - started
    out = pathlib.Path(args.out)
    write_report(out, command=command, args=args, methods=args.methods, chosen=chosen, results=results,
                 raw_tune=raw_tune, controls_tune=controls_tune, heldout=held, env=env,
                 protocol=get_protocol(args.protocol).to_dict(), elapsed=elapsed)
    record = {"command": command, "chosen": chosen, "tuning": {"raw": raw_tune, "controls": controls_tune,
                                                               "settings": results},
              "heldout": held, "environment": env, "args": {k: v for k, v in vars(args).items()}}
    write_json(out.with_suffix(".json"), record)
    _log(f"wrote {out} and {out.with_suffix('.json')}")
    return record


if __name__ == "__main__":
    main()
