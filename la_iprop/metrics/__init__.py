"""Evaluation of attribution maps: insertion and deletion games under explicit protocols."""

from la_iprop.metrics.insertion_deletion import (
                                                 IMAGENET_MEAN,
                                                 PROTOCOLS,
                                                 GameResult,
                                                 Protocol,
                                                 auc,
                                                 evaluate,
                                                 gaussian_blur,
                                                 gaussian_kernel1d,
                                                 get_protocol,
                                                 ranks,
                                                 substrate_mean_color,
)

__all__ = ["IMAGENET_MEAN", "PROTOCOLS", "GameResult", "Protocol", "auc", "evaluate", "gaussian_blur",
           "gaussian_kernel1d", "get_protocol", "ranks", "substrate_mean_color"]
