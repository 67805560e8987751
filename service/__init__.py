"""The REST service: validates specs, keeps a record of every experiment, submits Ray jobs over the
Jobs API, follows them, and reads results from MLflow (``hdet serve``; routes in docs/service.md).

Modules: ``settings`` (environment), ``states`` (record statuses), ``models``/``db`` (the store),
``schemas`` (responses), ``problems`` (RFC 9457 errors), ``intake`` + ``paths`` + ``admission``
(request body -> spec, within the data roots and the cluster's room), ``jobs`` (Ray Jobs API),
``mlflow_view`` (MLflow reads), ``experiments`` (submit, cancel), ``submitter`` + ``reconciler`` +
``transitions`` in ``background`` (sending and following jobs), ``app``/``routes`` (FastAPI),
``stack``/``cli`` (``hdet serve``), ``client``/``client_cli`` (the Python client, ``hdet submit``...).

Imports: :mod:`workers`' contract (``spec``, ``tracking``, ``summary``, ``evidence``, ``report``)
and its ``env``, ``resources`` and ``procfs``; never a training, the search or the driver (it reaches
them through Ray's Jobs API), nor :mod:`benchmarks` (``tests/test_layers.py``).
"""
