"""Studies: configurations of the run engine plus pure analysis of its stored per-image records.

- :mod:`~la_iprop.studies.reproduction`: the LA paper's comparison (every method, +IProp, two protocols).
- :mod:`~la_iprop.studies.la_ablations`: LA's ingredients as named variants ``la@LABEL`` of one run.
- :mod:`~la_iprop.studies.iprop_tuning` (+ ``iprop_tuning_report``): IProp's settings searched as named
  IProp variants of one run per split.
- :mod:`~la_iprop.studies.iprop_questions` (+ ``iprop_questions_report``): IProp's structure controls and
  corrupted images as named IProp variants, one run per part.
- :mod:`~la_iprop.studies.stability` (+ ``stability_report``): float32 vs float64, batch, one-ulp and seed
  noise of every method, as five runs of the engine.
"""
