"""Attribution methods behind one calling convention (see ``base``).

Importing this package registers every method; adding one means one file here and
one import line below.
"""

from la_iprop.attribution import la  # noqa: F401  (registers "la")
from la_iprop.attribution import agi, attexplore, big, mfaba  # noqa: F401  (agi attexplore big mfaba)
from la_iprop.attribution import deeplift, gradients, guided_ig, integrated  # noqa: F401  (sm sg fig ig eg gig deeplift)
from la_iprop.attribution.base import (MethodSpec, available_methods, get_method, method_hparams,
                                       register_method)

__all__ = ["MethodSpec", "available_methods", "get_method", "method_hparams", "register_method"]
