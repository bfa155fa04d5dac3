"""iprop_tuning_rise: IProp's settings tuned under RISE's per-pixel protocol with dir as the criterion (the
IProp paper's kind of evaluation), then tested on the 64 images of cpu_quick_64 for all 12 methods.

    python -m experiments.iprop_tuning --config=configs/iprop_tuning_rise.py

Tuning: sm, ig and la at their quick settings, la1000 images 7, 22, 37, ... (every 15th from 7: 50
images, disjoint from the held-out ones), protocol rise sampled at every 8th point, coordinate ascent
over the ablation grid (two passes), criterion dir (lower is better). Held-out: the 64 images of
cpu_quick_64 (every 15th from 0), all 12 methods, protocol rise: METHOD vs METHOD+ctrl vs METHOD+iprop
with paired CIs. Answers: with settings tuned under its own kind of protocol, does IProp lower dir?
Cost on a 2-core CPU: about 2 hours of tuning, then the 12 methods' maps on 64 images (about 6 hours).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "rise"
    config.report = "iprop_tuning_rise.md"
    config.methods = ("sm", "ig", "la")
    config.heldout_methods = ("agi", "attexplore", "big", "deeplift", "eg", "fig", "gig", "ig", "la", "mfaba",
                              "sg", "sm")
    config.model = "efficientnet_lite0"
    config.data = "la1000:../shared/data/la1000"
    config.settings = "quick"
    config.seed = 0
    config.precision = "float32"
    config.batch_size = 10
    config.protocol = "rise"
    config.tune_protocol = "rise_every8"
    config.tune = {"start": 7, "stride": 15, "num_images": 50}
    config.heldout = {"start": 0, "stride": 15, "num_images": 64}
    config.search = "coordinate"
    config.max_passes = 2
    config.criterion = "dir"
    config.grid = {}  # axes replacing those of la_iprop.iprop.tuning.GRID (smoke runs)
    return config
