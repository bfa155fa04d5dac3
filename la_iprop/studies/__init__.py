"""Studies: configurations of the run engine plus pure analysis of its stored per-image records.

- :mod:`~la_iprop.studies.reproduction`: the LA paper's comparison (every method, +IProp, two protocols).
"""
