"""The REST service: validates specs, keeps a record of every experiment, submits Ray jobs over the
Jobs API, follows them, and reads results from MLflow (``hdet serve``; routes in service/API.md).

Modules: ``settings`` (environment), ``states`` (record statuses), ``models``/``db`` (the store),
``schemas`` (responses), ``problems`` (RFC 9457 errors), ``intake`` (request body -> spec),
``jobs`` (Ray Jobs API), ``mlflow_view`` (MLflow reads), ``experiments`` (submit, cancel),
``verdict`` + ``reconciler`` (following jobs), ``app``/``routes`` (FastAPI), ``stack``/``cli``
(``hdet serve``). ``hdet bench api`` lives in ``benchmarks.api``.
"""
