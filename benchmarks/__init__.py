"""The benchmarks: the commands of ``hdet bench`` and their machinery, apart from the product as
Ray's ``release/`` is apart from Ray.

One module per command (``hdet bench X`` is :mod:`benchmarks.X`'s ``main``):

* ``loss``: training-step time with the HarmonicDet loss / with the standard loss.
* ``eval``: this project's COCO evaluation time / pycocotools' (and the generated set both read).
* ``train``: images/s of a Ray Train worker / a plain loop, in turns; ``pace`` (the sides' turns,
  SIGSTOP of the others' processes), ``plain_loop`` (the baselines) and ``cpu_share`` (who used the
  cores) beside it.
* ``search``: ASHA + TPE against grid search, and a trial's fixed cost; ``timeline`` reads where a
  trial's start-up time goes.
* ``experiment``: a comparison's trainings' times alone / (its wall time x trainings at once).
* ``api``: the REST API's latency under load.

It may import every package below it (``harmonic``, ``workers``, ``service``); none of them imports
it (``tests/test_layers.py``). A benchmark acts inside a training worker only through the loop's
hooks (:mod:`workers.training.hooks`, named in ``HDET_TRAIN_HOOKS``: ``benchmarks.pace:hook``,
``benchmarks.timeline:hook``) and reads the search's start-up marks from the file
:mod:`workers.marks` writes.
"""
