"""cpu_quick_64: the LA paper's comparison on 64 la1000 images (every 15th: all 20 classes), on a CPU.

    python -m experiments.reproduce --config=configs/cpu_quick_64.py

Every registered method at its quick settings, each with IProp and IProp's gamma = 0 control
(36 variants), EfficientNet-Lite0, float32, scored under protocols la and rise; LA also with
seeds 1 and 2. Cost on a 2-core CPU (AMD EPYC Zen 4): about 14 hours, resumable (it ran across
several sessions). Answers: do LA's claims (best insertion, best ins - del, lowest deletion) and
IProp's (better dir / ins - del than the raw map and than the control) hold, with paired CIs?
Results: results/reproduction/cpu_quick_64/, results/REPRODUCTION.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "cpu_quick_64"
    config.data = "la1000:../shared/data/la1000"
    config.num_images = 64
    config.stride = 15
    config.batch_size = 8
    config.settings = "quick"
    config.protocols = ("la", "rise")
    config.iprop = True
    config.seed = 0
    config.precision = "float32"
    config.la_seeds = 3
    return config
