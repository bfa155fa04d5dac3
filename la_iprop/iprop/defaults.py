"""IProp hyperparameters: the one place where their defaults and named presets live.

The paper leaves these open. The values below scored the best mean insertion - deletion of sm,
ig and la (EfficientNet-Lite0, protocol ``la``) on the tuning split of la1000 (images 0-199 in
steps of 4) in a coordinate search over K, R, gamma, sigma_c, colour space and reward rule;
``results/iprop_ablation.md`` has the search, the command that regenerates it and the held-out
check (images 800-999): IProp helps sm and ig there and hurts la. gamma = 0.99 is the edge of
the searched grid. The reward rule (positive_sum or abs_sum over sum: +0.07) and gamma (0.99
over 0.9: +0.02) decide the score; K, R, sigma_c and the colour space move it by < 0.005.

**Presets.** :data:`PRESETS` names tuned settings, ``{name: {hyperparameter: value}}``: ``"la"`` is
the setting above (the library defaults, tuned under protocol ``la``); ``"rise"`` is the best mean dir
(deletion / insertion) of sm, ig and la under protocol ``rise`` (at every 8th point) on 50 la1000 images
(7, 22, 37, ...) in a coordinate search over the same grid, by ``python -m experiments.iprop_tuning
--config=configs/iprop_tuning_rise.py`` (``results/iprop_tuning_rise.md``): K = 8, R = 2, gamma = 0.99,
sigma_c = 0.3, CIELab, abs_sum. It is the best *propagation* there, not an improvement: the raw maps
(dir 0.384) and the gamma = 0 control with abs_sum (0.362, no propagation) score better than it (0.400).
The CLI's default preset stays ``"la"`` (the library defaults, and the engine's default protocol is
``la``); a run scored under ``rise`` takes ``--iprop_preset=rise``. A preset fixes the tuned
hyperparameters only; the others (``tol``, ``max_iter`` and the structure controls) keep their
defaults unless overridden. :func:`resolve_config` turns ``preset=`` + overrides into an
:class:`IPropConfig`; adding a preset is one entry in :data:`PRESETS` (validated by the tests).

**Structure controls** (issue 27; defaults give the paper's graph, so they change nothing unless set):

- ``graph``: ``"knn"`` (the K nearest window candidates in the joint space), ``"random_window"`` (K
  candidates of the same clamped ``(2R+1)^2`` window drawn uniformly without replacement) or
  ``"random_image"`` (K pixels drawn uniformly without replacement from the whole image, ``radius``
  unused, ``K <= H*W - 1``). Random graphs are drawn from ``graph_seed`` alone: the same graph for
  every image of a size (see :mod:`la_iprop.iprop.graph`).
- ``similarity``: which terms the distance has, ``"joint"`` (spatial + colour, the paper's), ``"spatial"``
  (``|dpos|^2 / sigma_s^2`` only, ``sigma_c`` unused) or ``"color"`` (``|dcol|^2 / sigma_c^2`` only,
  ``sigma_s`` unused; the window still bounds the candidates). A string, not ``sigma = inf``: run
  identities are JSON, which has no infinity, and the intent is explicit.
- ``edge_weights``: ``"similarity"`` (``w_ij = exp(-d_ij^2)``), ``"uniform"`` (``w_ij = 1``, so
  ``P_ij = 1/K``) or ``"auto"`` (the default: ``similarity`` for ``knn``, ``uniform`` for the random
  graphs). Uniform weights make a random graph "any smoothing of the same degree and discount", the
  control that isolates the graph's structure; ``similarity`` on a random graph keeps the weighting
  function and changes only which neighbours are kept (on ``random_image`` the spatial term then
  puts nearly all of a row's weight on its spatially nearest draw).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from la_iprop.checks import check_choice, check_in_range, check_int_at_least, check_nonnegative, check_positive

__all__ = ["COLOR_SPACES", "REWARD_RULES", "GRAPHS", "SIMILARITIES", "EDGE_WEIGHTS", "DEFAULT_K", "DEFAULT_RADIUS",
           "DEFAULT_SIGMA_S", "DEFAULT_SIGMA_C", "DEFAULT_COLOR_SPACE", "DEFAULT_GAMMA", "DEFAULT_REWARD",
           "DEFAULT_TOL", "DEFAULT_MAX_ITER", "DEFAULT_GRAPH", "DEFAULT_GRAPH_SEED", "DEFAULT_SIMILARITY",
           "DEFAULT_EDGE_WEIGHTS", "DEFAULT_PRESET", "PRESETS", "IPropConfig", "check_graph_hparams",
           "check_propagation_hparams", "preset_hparams", "resolve_config", "resolved_edge_weights", "uses_window"]

COLOR_SPACES = ("rgb", "lab")
REWARD_RULES = ("sum", "abs_sum", "positive_sum")
GRAPHS = ("knn", "random_window", "random_image")
SIMILARITIES = ("joint", "spatial", "color")
EDGE_WEIGHTS = ("auto", "similarity", "uniform")

DEFAULT_K = 16              # neighbours kept per pixel
DEFAULT_RADIUS = 2          # candidate window (2R+1)^2
DEFAULT_SIGMA_S = 1.0       # spatial bandwidth, pixels
DEFAULT_SIGMA_C = 0.1       # colour bandwidth, in the colour space's units (RGB in [0,1]; CIELab / 100)
DEFAULT_COLOR_SPACE = "rgb"
DEFAULT_GAMMA = 0.99        # discount of the Markov Reward Process
DEFAULT_REWARD = "positive_sum"  # channel aggregation of the attribution into a per-pixel reward
DEFAULT_TOL = 1e-4          # stop when max|V_new - V| <= tol * max|r|
DEFAULT_MAX_ITER = 1000
DEFAULT_GRAPH = "knn"       # the paper's graph; "random_window" / "random_image" are structure controls
DEFAULT_GRAPH_SEED = 0      # draws the random graphs (unused by knn)
DEFAULT_SIMILARITY = "joint"  # spatial + colour terms in d^2
DEFAULT_EDGE_WEIGHTS = "auto"  # exp(-d^2) for knn, 1/K for the random graphs

# Named tuned settings (see the module docstring): "la" tuned under protocol la (the defaults above),
# "rise" under protocol rise (criterion dir).
PRESETS: dict[str, dict[str, Any]] = {
    "la": {"k": DEFAULT_K, "radius": DEFAULT_RADIUS, "sigma_s": DEFAULT_SIGMA_S, "sigma_c": DEFAULT_SIGMA_C,
           "color_space": DEFAULT_COLOR_SPACE, "gamma": DEFAULT_GAMMA, "reward": DEFAULT_REWARD},
    "rise": {"k": 8, "radius": 2, "sigma_s": 1.0, "sigma_c": 0.3, "color_space": "lab", "gamma": 0.99,
             "reward": "abs_sum"},
}
DEFAULT_PRESET = "la"       # the preset the defaults equal

# The structure controls and their defaults (IPropConfig.as_dict leaves them out when all are at these).
_STRUCTURE_DEFAULTS = {"graph": DEFAULT_GRAPH, "graph_seed": DEFAULT_GRAPH_SEED, "similarity": DEFAULT_SIMILARITY,
                       "edge_weights": DEFAULT_EDGE_WEIGHTS}
_SEED_LIMIT = 2 ** 64       # graph_seed: a 64-bit unsigned integer (two 32-bit words of the threefry key)


def uses_window(graph: str) -> bool:
    """Whether a graph kind draws its neighbours from the clamped ``(2R+1)^2`` window (all but random_image)."""
    return graph != "random_image"


def resolved_edge_weights(graph: str, edge_weights: str) -> str:
    """``"auto"`` -> ``"similarity"`` for ``knn``, ``"uniform"`` for the random graphs; other values as given."""
    if edge_weights == "auto":
        return "similarity" if graph == "knn" else "uniform"
    return edge_weights


def _check_bandwidth(name: str, sigma: Any, hint: str) -> None:
    if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and math.isinf(sigma):
        raise ValueError(f"{name} must be a finite number, got {sigma!r} (to turn its term off use {hint})")
    check_positive(name, sigma)
    if not math.isfinite(sigma):
        raise ValueError(f"{name} must be a finite number, got {sigma!r}")


def check_graph_hparams(k: Any, radius: Any, sigma_s: Any, sigma_c: Any, color_space: Any, *,
                        graph: Any = DEFAULT_GRAPH, graph_seed: Any = DEFAULT_GRAPH_SEED,
                        similarity: Any = DEFAULT_SIMILARITY, edge_weights: Any = DEFAULT_EDGE_WEIGHTS) -> None:
    """The graph hyperparameters on their own (the image size is checked by
    :func:`~la_iprop.iprop.meta.check_iprop_settings`)."""
    check_choice("graph", graph, GRAPHS)
    check_int_at_least("radius", radius, 1)
    check_int_at_least("k", k, 1)
    candidates = (2 * radius + 1) ** 2 - 1  # the window minus the pixel itself
    if uses_window(graph) and k > candidates:
        raise ValueError(f"k must be <= (2*radius+1)**2 - 1 = {candidates} (the window's pixels other than the "
                         f"centre) for radius={radius}, got k={k}")
    _check_bandwidth("sigma_s", sigma_s, "similarity='color'")
    _check_bandwidth("sigma_c", sigma_c, "similarity='spatial'")
    check_choice("color_space", color_space, COLOR_SPACES)
    check_choice("similarity", similarity, SIMILARITIES)
    check_choice("edge_weights", edge_weights, EDGE_WEIGHTS)
    if isinstance(graph_seed, bool) or not isinstance(graph_seed, numbers.Integral):
        raise TypeError(f"graph_seed must be an integer in [0, 2**64), got {graph_seed!r}")
    if not 0 <= graph_seed < _SEED_LIMIT:
        shown = graph_seed if abs(graph_seed) < 10 ** 30 else f"an integer of {int(graph_seed).bit_length()} bits"
        raise ValueError(f"graph_seed must be an integer in [0, 2**64), got {shown}")


def check_propagation_hparams(gamma: Any, tol: Any, max_iter: Any) -> None:
    check_in_range("gamma", gamma, 0.0, 1.0)
    check_nonnegative("tol", tol)
    if not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number, got {tol!r}")
    check_int_at_least("max_iter", max_iter, 1)


@dataclasses.dataclass(frozen=True)
class IPropConfig:
    """All IProp hyperparameters (hashable: usable as a static jit argument and a cache key).

    Numbers are normalised to Python ``int``/``float`` so that :meth:`as_dict` is JSON-serialisable
    (a run identity) and equal settings hash equally.
    """

    k: int = DEFAULT_K
    radius: int = DEFAULT_RADIUS
    sigma_s: float = DEFAULT_SIGMA_S
    sigma_c: float = DEFAULT_SIGMA_C
    color_space: str = DEFAULT_COLOR_SPACE
    gamma: float = DEFAULT_GAMMA
    reward: str = DEFAULT_REWARD
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    graph: str = DEFAULT_GRAPH
    graph_seed: int = DEFAULT_GRAPH_SEED
    similarity: str = DEFAULT_SIMILARITY
    edge_weights: str = DEFAULT_EDGE_WEIGHTS

    def __post_init__(self):
        check_graph_hparams(self.k, self.radius, self.sigma_s, self.sigma_c, self.color_space, graph=self.graph,
                            graph_seed=self.graph_seed, similarity=self.similarity, edge_weights=self.edge_weights)
        check_propagation_hparams(self.gamma, self.tol, self.max_iter)
        check_choice("reward", self.reward, REWARD_RULES)
        for name in ("sigma_s", "sigma_c", "gamma", "tol"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("k", "radius", "max_iter", "graph_seed"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "IPropConfig":
        """The named preset of :data:`PRESETS`, with ``overrides`` on top."""
        return cls().replace(**{**preset_hparams(preset), **overrides})

    def replace(self, **changes: Any) -> "IPropConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown IProp hyperparameter(s) {sorted(unknown)}; "
                            f"expected some of {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def as_dict(self, *, full: bool = False) -> dict[str, Any]:
        """The hyperparameters as a JSON-serialisable dict (strings, ints and finite floats), a run identity's
        record: ``IPropConfig(**config.as_dict()) == config``.

        The structure controls (``graph``, ``graph_seed``, ``similarity``, ``edge_weights``, added after runs
        were first stored) appear only when one of them is not at its default, then all four, so records of
        the paper's graph keep the form they had before the controls existed (a stored run still resumes).
        ``full=True``: every field.
        """
        record = dataclasses.asdict(self)
        if not full and all(record[name] == default for name, default in _STRUCTURE_DEFAULTS.items()):
            for name in _STRUCTURE_DEFAULTS:
                del record[name]
        return record

    @property
    def effective_edge_weights(self) -> str:
        """``"similarity"`` or ``"uniform"`` (``"auto"`` resolved for this graph)."""
        return resolved_edge_weights(self.graph, self.edge_weights)

    def tag(self) -> str:
        """A short, filename-safe description, e.g. ``k8_r2_ss1_sc0.1_lab_g0.9_sum_tol0.0001_it1000``.

        The structure controls appear only where they change the computation (so the default graph keeps
        the tag it had before they existed): ``_random_window-s3`` (graph and seed), ``_w-uniform`` (edge
        weights other than the graph's default), ``_sim-spatial`` (a similarity other than joint).
        """
        tag = (f"k{self.k}_r{self.radius}_ss{self.sigma_s:g}_sc{self.sigma_c:g}_{self.color_space}"
               f"_g{self.gamma:g}_{self.reward}_tol{self.tol:g}_it{self.max_iter}")
        if self.graph != DEFAULT_GRAPH:
            tag += f"_{self.graph}-s{self.graph_seed}"
        if self.effective_edge_weights != resolved_edge_weights(self.graph, "auto"):
            tag += f"_w-{self.effective_edge_weights}"
        if self.similarity != DEFAULT_SIMILARITY:
            tag += f"_sim-{self.similarity}"
        return tag


def preset_hparams(preset: Any) -> dict[str, Any]:
    """The hyperparameters of a named preset (a copy); one-line ``ValueError`` for an unknown name."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return dict(PRESETS[preset])


def resolve_config(preset: str | None = None, config: IPropConfig | None = None, **hparams: Any) -> IPropConfig:
    """The :class:`IPropConfig` of ``preset`` or ``config`` (at most one; neither: the defaults) with
    ``hparams`` on top. ``TypeError`` for unknown hyperparameter names or a ``config`` of the wrong type,
    ``ValueError`` for bad values, an unknown preset, or both ``preset`` and ``config``."""
    if preset is not None and config is not None:
        raise ValueError("pass either preset= or config= (an IPropConfig), not both")
    if config is not None:
        if not isinstance(config, IPropConfig):
            raise TypeError(f"config must be an IPropConfig, got {type(config).__name__}")
        return config.replace(**hparams) if hparams else config
    if preset is not None:
        return IPropConfig.from_preset(preset, **hparams)
    return IPropConfig().replace(**hparams)
