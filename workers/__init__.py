"""The Ray and MLflow layer of HarmonicDet: ``python -m workers.run SPEC`` and the ``hdet`` CLI.

Sub-packages and modules by role:

* the contract the service imports: :mod:`workers.spec` (the experiment spec, no torch, Ray or
  MLflow), :mod:`workers.tracking` (the MLflow tags, artifact layout, parent and child runs) and
  :mod:`workers.summary` (an experiment's evidence read back from MLflow, without Ray);
* the statistics and their renderers: :mod:`workers.evidence`, :mod:`workers.report`;
* one training: :mod:`workers.training` (Ray Train controller and worker loop);
* many trainings: :mod:`workers.search` (Ray Tune, seeds, rounds, slots);
* the driver: :mod:`workers.run` (with ``signals``, ``pretrain``), the local Ray and ``$HDET_HOME``
  (``env``), resources (``resources``), ``hdet predict`` (``predict``), and :mod:`workers.cli`,
  which routes each ``hdet`` command to its module by name and imports nothing above it.

Imports go down: :mod:`harmonic` below, never :mod:`service` or :mod:`benchmarks`; the contract
imports neither the trainings nor the search; :mod:`workers.training` never imports the search or
the driver (``tests/test_layers.py`` checks these edges, string imports included).
"""
