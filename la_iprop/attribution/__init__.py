"""Attribution methods behind one calling convention (see ``base``).

Importing this package registers every method; adding one means one file here and
one name in the import below.
"""

# Imported for their registrations: la; sm, fig, sg (gradients); ig, eg (integrated); gig; deeplift;
# big; agi; mfaba; attexplore.
from la_iprop.attribution import (  # noqa: F401
    agi,
    attexplore,
    big,
    deeplift,
    gradients,
    guided_ig,
    integrated,
    la,
    mfaba,
)
from la_iprop.attribution.base import MethodSpec, available_methods, get_method, method_hparams, register_method

__all__ = ["MethodSpec", "available_methods", "get_method", "method_hparams", "register_method"]
