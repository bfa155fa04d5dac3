"""la_ablations: which of LA's ingredients produce its advantage (spatial range, sampling counts, attack
strategy, local vs global exploration), with paired CIs against the default LA.

    python -m experiments.la_ablations --config=configs/la_ablations.py
    python -m experiments.la_ablations --config=configs/la_ablations.py --interim      # report while it runs
    python -m experiments.la_ablations --config=configs/la_ablations.py --report_only  # rebuild the report

One run of the engine on the 64 la1000 images of cpu_quick_64 (every 15th), EfficientNet-Lite0,
float32, protocols la and rise; every variant is `la` at the quick settings (s=10, T=10, K=6) with
the overrides below, computed batch-major on the same images. Cost on a 2-core CPU (AMD EPYC Zen
4), measured: about 23 minutes per batch of 8 images for all 18 variants with the CPU to itself (about 3
hours in all; 8.3 h of wall-clock computing beside other niced runs; the official default sets are a
third of it). Results: results/LA_ABLATIONS.md, results/la_ablations/cpu_quick_64/.
"""

import ml_collections

QUESTIONS = {
    "Spatial range s (eps = x0 / s)": ["s5", "default", "s15", "s20", "s30"],
    "Sampling count K (T = 10)": ["K2", "default", "K11", "K20"],
    "Steps T (K = 6)": ["T3", "default", "T30"],
    "The official default sets": ["default", "official_function", "official_cli"],
    "Attack strategy (K = 6 runs each)": ["default", "targeted", "untargeted"],
    "Local vs global exploration": ["default", "pgd_box", "pgd_none", "pgd_box_step1", "pgd_none_step1"],
}

# Direct comparisons (a − b), beyond each variant against the default: the same PGD walk without and
# with the local box is the paper's local-vs-global question with everything else equal.
PAIRS = (("pgd_none", "pgd_box"), ("pgd_none_step1", "pgd_box_step1"))

VARIANTS = {
    "default": {},
    "s5": {"spatial_range": 5.0}, "s15": {"spatial_range": 15.0}, "s20": {"spatial_range": 20.0},
    "s30": {"spatial_range": 30.0},
    "K2": {"sampling_times": 2}, "K11": {"sampling_times": 11}, "K20": {"sampling_times": 20},
    "T3": {"max_iter": 3}, "T30": {"max_iter": 30},
    # the official repository's la() defaults, and its CLI/README defaults
    "official_function": {"spatial_range": 10.0, "max_iter": 30, "sampling_times": 20},
    "official_cli": {"spatial_range": 20.0, "max_iter": 20, "sampling_times": 20},
    # the same number of runs (K = 6): all targeted, or the (deterministic) untargeted run only
    "targeted": {"strategy": "targeted"},
    "untargeted": {"strategy": "untargeted"},
    # the official walk restarts from x0 each step; PGD walks on (step 2 eps / T), inside the box or
    # only clipped to [0, 1] (global); with step eps the global walk can reach T * eps from x0
    "pgd_box": {"update": "pgd", "constraint": "box"},
    "pgd_none": {"update": "pgd", "constraint": "none"},
    "pgd_box_step1": {"update": "pgd", "constraint": "box", "step_size": 1.0},
    "pgd_none_step1": {"update": "pgd", "constraint": "none", "step_size": 1.0},
}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "cpu_quick_64"
    config.reproduction = "cpu_quick_64"  # LA's seed spread at the default settings, on the same images
    config.model = "efficientnet_lite0"
    config.data = "la1000:../shared/data/la1000"
    config.num_images = 64
    config.stride = 15
    config.batch_size = 8
    config.settings = "quick"
    config.protocols = ("la", "rise")
    config.seed = 0
    config.precision = "float32"
    config.variants = VARIANTS
    config.questions = QUESTIONS
    config.question_order = tuple(QUESTIONS)  # (a ConfigDict sorts its keys)
    config.pairs = PAIRS
    return config
