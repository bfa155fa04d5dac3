"""iprop_questions: IProp's open questions with paired CIs -- does the graph's structure matter, which
similarity carries the gain, and does the gain (and LA's advantage) survive corrupted images.

    python -m experiments.iprop_questions --config=configs/iprop_questions.py                  # run / resume
    python -m experiments.iprop_questions --config=configs/iprop_questions.py --interim        # report while it runs
    python -m experiments.iprop_questions --config=configs/iprop_questions.py --report_only    # rebuild the report
    python -m experiments.iprop_questions --config=configs/iprop_questions.py --parts=structure

The 64 la1000 images of cpu_quick_64 (every 15th; disjoint from the IProp tuning splits),
EfficientNet-Lite0, float32, protocols la and rise, IProp with the library's preset ("la"):

- structure: sm, ig, gig and la, each raw, with IProp on the KNN graph (@knn) and with four
  controls that change one thing (random graphs of the same out-degree, gamma and reward, drawn in
  the window or over the whole image, with uniform weights; the spatial or the colour term alone).
- ood: sm, ig, gig, la, big and agi (the 12 methods do not fit this CPU's time; these six span
  gradients, paths and adversarial exploration), raw and with IProp, on the images under four
  ImageNet-C corruptions at severity 3 (package imagecorruptions, seeded per image).

Question 1 (IProp tuned under rise) is configs/iprop_tuning_rise.py; the report reads its JSON and
the reproduction's cpu_quick_64 section. Results: results/IPROP_QUESTIONS.md,
results/iprop_questions/cpu_quick_64/. Cost on a 2-core CPU (AMD EPYC Zen 4): every variant is
scored under two protocols at about 5 s per map and protocol, so about 4 hours for the structure
part (24 variants) and about 2.5 hours per corruption (12 variants, plus the maps of big and agi).
"""

import ml_collections

CONTROLS = {
    "random_window": {"graph": "random_window"},   # K of the window's candidates, uniformly, weights 1/K
    "random_image": {"graph": "random_image"},     # K pixels of the whole image, uniformly, weights 1/K
    "spatial": {"similarity": "spatial"},          # the KNN graph and weights without the colour term
    "color": {"similarity": "color"},              # ... without the spatial term (within the window)
}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "cpu_quick_64"
    config.model = "efficientnet_lite0"
    config.data = "la1000:../shared/data/la1000"
    config.num_images = 64
    config.start = 0
    config.stride = 15
    config.batch_size = 8
    config.settings = "quick"
    config.seed = 0
    config.precision = "float32"
    config.protocols = ("la", "rise")
    config.iprop_preset = "la"
    config.structure_methods = ("sm", "ig", "gig", "la")
    config.controls = CONTROLS
    config.ood_methods = ("sm", "ig", "gig", "la", "big", "agi")
    config.corruptions = ("gaussian_noise:3", "defocus_blur:3", "jpeg_compression:3", "contrast:3")
    config.corruption_seed = 0
    config.parts = ("structure", "ood")
    config.tuning_report = "iprop_tuning_rise.json"  # results/<this>: question 1 (configs/iprop_tuning_rise.py)
    config.reproduction = "cpu_quick_64"  # results/reproduction/<this>: the la preset under rise, same images
    return config
