"""la_iprop: Local Attribution (LA), IProp and their evaluation in JAX/Flax."""

__version__ = "0.1.0"
