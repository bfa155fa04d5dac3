"""gpu_paper_256: the LA paper's comparison at the methods' paper settings on 256 la1000 images, one GPU.

    python -m experiments.reproduce --config=configs/gpu_paper_256.py
    bash scripts/gpu_reproduction.sh          # the same, with a persistent compilation cache

Every registered method at its paper settings (LA: s=10, T=30, K=20), + IProp and its gamma = 0
control, protocols la and rise, LA over 3 seeds, float32 (full float32 matmuls). Sized for about 9
minutes of H100 time (estimate from the H100 figures in docs/performance.md); on a 2-core CPU it
would take weeks. Answers the reproduction's questions at the paper's settings.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "gpu_paper_256"
    config.data = "la1000:../shared/data/la1000"
    config.num_images = 256
    config.stride = 3
    config.batch_size = 32
    config.settings = "paper"
    config.protocols = ("la", "rise")
    config.iprop = True
    config.la_seeds = 3
    return config
