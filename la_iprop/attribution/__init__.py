"""Attribution methods behind one calling convention (see ``base``).

Importing this package registers every method; adding one means one file here and
one import line below.
"""

from la_iprop.attribution import (  # noqa: F401  (agi attexplore big mfaba)  # noqa: F401  (sm sg fig ig eg gig deeplift)
                                       agi,
                                       attexplore,
                                       big,
                                       deeplift,
                                       gradients,
                                       guided_ig,
                                       integrated,
                                       la,  # noqa: F401  (registers "la")
                                       mfaba,
)
from la_iprop.attribution.base import MethodSpec, available_methods, get_method, method_hparams, register_method

__all__ = ["MethodSpec", "available_methods", "get_method", "method_hparams", "register_method"]
