"""The run engine: one configuration, one identity, one store for every run and study.

- :mod:`~la_iprop.runs.config`: :class:`RunConfig`, its validation and the hyperparameters in effect.
- :mod:`~la_iprop.runs.prepare`: every check before the first write (model, images, hyperparameters).
- :mod:`~la_iprop.runs.engine`: :func:`run`, the batch-major loop (maps once, scores per protocol).
- :mod:`~la_iprop.runs.store`: the run folder: identity, atomic writes, resume checks, quarantine.
- :mod:`~la_iprop.runs.report`: per-image CSV, summary, tables and figures read back from the store.
- :mod:`~la_iprop.runs.validation`: every setting checked cheaply, before any model is loaded.
- :mod:`~la_iprop.runs.outdir`: where a run may write (empty or its own folder; never /, home or the data).
- :mod:`~la_iprop.runs.checksums`, :mod:`~la_iprop.runs.files`, :mod:`~la_iprop.runs.fingerprint`: batch
  content checksums, atomic writes and moves, image hashes.
- :mod:`~la_iprop.runs.sweep`: a grid of runs; :mod:`~la_iprop.runs.environment`: versions and device.
- :mod:`~la_iprop.runs.progress`, :mod:`~la_iprop.runs.multihost`, :mod:`~la_iprop.runs.external_maps`
  (with :mod:`~la_iprop.runs.map_layouts`).
"""

from la_iprop.runs.config import RunConfig, parse_hparams
from la_iprop.runs.engine import report_interim, run
from la_iprop.runs.store import ConfigError, load_records

__all__ = ["RunConfig", "ConfigError", "run", "report_interim", "parse_hparams", "load_records"]
