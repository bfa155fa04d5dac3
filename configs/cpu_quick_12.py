"""cpu_quick_12: the first, 12-image CPU reproduction (la1000 images 0-11, protocol la only).

    python -m experiments.reproduce --config=configs/cpu_quick_12.py

Every registered method at its quick settings, + IProp and its gamma = 0 control, float32.
Cost on a 2-core CPU: about 2.5 hours. Kept as a small, fast check of the report; its images are
four classes only, so cpu_quick_64 is the run to quote. Results: results/reproduction/cpu_quick_12/.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "cpu_quick_12"
    config.data = "la1000:../shared/data/la1000"
    config.num_images = 12
    config.batch_size = 6
    config.settings = "quick"
    config.protocols = ("la",)
    config.iprop = True
    config.la_seeds = 3
    return config
