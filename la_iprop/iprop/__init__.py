"""IProp: attribution post-processing by information propagation over a pixel graph.

Yang, Wang, Bilgic, "Leveraging Local Structure for Improving Model Explanations: An
Information Propagation Approach" (CIKM 2024). Pixels are nodes of a KNN graph in the joint
spatial + colour space (:mod:`~la_iprop.iprop.graph`, which also has the structure controls: random
graphs, spatial-only and colour-only similarity, uniform weights); an attribution gives each pixel a
reward and the output is the value of the Markov Reward Process ``V = r + gamma P V``
(:mod:`~la_iprop.iprop.propagate`). :func:`iprop` applies it to a batch of maps,
:func:`with_iprop` wraps any attribution method and :func:`check_iprop_settings` validates settings
for an image size without running anything. Defaults and named presets: :mod:`~la_iprop.iprop.defaults`.
"""

from la_iprop.iprop.defaults import (
                                     COLOR_SPACES,
                                     DEFAULT_COLOR_SPACE,
                                     DEFAULT_EDGE_WEIGHTS,
                                     DEFAULT_GAMMA,
                                     DEFAULT_GRAPH,
                                     DEFAULT_GRAPH_SEED,
                                     DEFAULT_K,
                                     DEFAULT_MAX_ITER,
                                     DEFAULT_PRESET,
                                     DEFAULT_RADIUS,
                                     DEFAULT_REWARD,
                                     DEFAULT_SIGMA_C,
                                     DEFAULT_SIGMA_S,
                                     DEFAULT_SIMILARITY,
                                     DEFAULT_TOL,
                                     EDGE_WEIGHTS,
                                     GRAPHS,
                                     PRESETS,
                                     REWARD_RULES,
                                     SIMILARITIES,
                                     IPropConfig,
                                     preset_hparams,
                                     resolve_config,
)
from la_iprop.iprop.graph import (
                                     PixelGraph,
                                     knn_graph,
                                     pixel_graph,
                                     random_graph,
                                     random_receivers,
                                     rgb_to_lab,
                                     to_dense,
)
from la_iprop.iprop.meta import (
                                     IPROP_SUFFIX,
                                     check_iprop_settings,
                                     default_chunk_size,
                                     iprop,
                                     iprop_name,
                                     iprop_single,
                                     parse_iprop_name,
                                     with_iprop,
)
from la_iprop.iprop.propagate import (
                                     iteration_bound,
                                     propagate,
                                     propagation_step,
                                     reward_from_attribution,
                                     transition_matvec,
                                     window_matvec,
)

__all__ = ["COLOR_SPACES", "DEFAULT_COLOR_SPACE", "DEFAULT_EDGE_WEIGHTS", "DEFAULT_GAMMA", "DEFAULT_GRAPH",
           "DEFAULT_GRAPH_SEED", "DEFAULT_K", "DEFAULT_MAX_ITER", "DEFAULT_PRESET", "DEFAULT_RADIUS", "DEFAULT_REWARD",
           "DEFAULT_SIGMA_C", "DEFAULT_SIGMA_S", "DEFAULT_SIMILARITY", "DEFAULT_TOL", "EDGE_WEIGHTS", "GRAPHS",
           "PRESETS", "REWARD_RULES", "SIMILARITIES", "IPROP_SUFFIX", "IPropConfig", "PixelGraph",
           "check_iprop_settings", "default_chunk_size", "knn_graph", "pixel_graph", "preset_hparams",
           "random_graph", "random_receivers", "resolve_config", "rgb_to_lab", "to_dense", "iprop", "iprop_name",
           "iprop_single", "parse_iprop_name", "with_iprop", "iteration_bound", "propagate", "propagation_step",
           "reward_from_attribution", "transition_matvec", "window_matvec"]
