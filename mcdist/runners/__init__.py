"""How the ranks of a job are run: one module per way, used by training, evaluation and generation alike.

A *rank function* is a module-level function ``rank_fn(rank, world_size, device, where, *args) -> dict`` called
on every rank of an initialised process group (``device``: where this rank computes, ``"cpu"`` or its GPU;
``where``: text naming this rank's machine, appended to error messages). Rank 0's dict, JSON-safe, is the job's
result.

* :mod:`mcdist.runners.spawned`: fresh processes on this machine (:func:`~mcdist.runners.spawned.run_spawned`).
* :mod:`mcdist.runners.torchrun`: this process is one rank of a job ``torchrun`` started.
* :mod:`mcdist.runners.ray`: one Ray Train worker per rank, on a local Ray or a cluster.
* :mod:`mcdist.runners.problems`: how a rank that finds a bad request tells the others and the caller.
"""
