"""iprop_tuning_la: IProp's settings tuned under protocol la (ins − del), on the run engine.

    python -m experiments.iprop_tuning --config=configs/iprop_tuning_la.py

sm, ig and la at their quick settings on EfficientNet-Lite0; tuning split la1000 0-199 every 4th (50
images), scored with protocol la sampled at every 8th point; coordinate ascent over the ablation grid
(k, radius, gamma, sigma_c, colour space, reward; two passes); held-out split 800-999 every 2nd (100
images) under protocol la itself. The same study as the earlier results/iprop_ablation.md (which chose
the library's "la" preset); cost on a 2-core CPU: about 2 hours.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "la"
    config.report = "iprop_tuning_la.md"
    config.methods = ("sm", "ig", "la")
    config.heldout_methods = ()  # () = the tuned methods
    config.model = "efficientnet_lite0"
    config.data = "la1000:../shared/data/la1000"
    config.settings = "quick"
    config.seed = 0
    config.precision = "float32"
    config.batch_size = 10
    config.protocol = "la"
    config.tune_protocol = "la_every8"
    config.tune = {"start": 0, "stride": 4, "num_images": 50}
    config.heldout = {"start": 800, "stride": 2, "num_images": 100}
    config.search = "coordinate"
    config.max_passes = 2
    config.criterion = "ins_minus_del"
    config.grid = {}  # axes replacing those of la_iprop.iprop.tuning.GRID (smoke runs)
    return config
