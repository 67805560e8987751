"""One training on Ray Train: what runs in the Train controller and in every training worker.

* :mod:`~workers.training.trainer`: the ``TorchTrainer`` subclass and its construction;
  :mod:`~workers.training.controller_hooks` what the Train controller runs (failure policy, report
  callback, process-group setup); :mod:`~workers.training.run_tracking` the seed's MLflow run.
* :mod:`~workers.training.worker_loop`: a worker's epoch loop; :mod:`~workers.training.epoch_metrics`
  its training epoch and held-out metrics, :mod:`~workers.training.train_state` its checkpoints,
  :mod:`~workers.training.hooks` the callbacks (phases, epochs, steps) that the benchmarks and the
  tests' fault injection plug into, named in ``HDET_TRAIN_HOOKS``.
* :mod:`~workers.training.recipe`: datasets, model, loaders, optimizer and schedule of a spec
  (shared with pretraining and the benchmarks' plain loop); :mod:`~workers.training.weights` the
  starting weights; :mod:`~workers.training.errors` the errors that stop a training without retry.

May import :mod:`harmonic`, the contract (:mod:`workers.spec`, :mod:`workers.tracking`,
:mod:`workers.summary`'s records) and the infrastructure modules of :mod:`workers` (``env``,
``resources``, ``pretrain``); never the search, the driver, the service or the benchmarks
(``tests/test_layers.py``). Nothing is imported here, so that a worker loads only what it uses.
"""
