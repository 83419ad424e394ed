"""Training: the trainer (:mod:`mcdist.train.trainer`), each rank's data (:mod:`mcdist.train.data`), the checks
a run passes first (:mod:`mcdist.train.checks`), training checkpoints (:mod:`mcdist.train.state`), the run
through Ray Train (:mod:`mcdist.train.ray_job`) and ``mcdist compare`` (:mod:`mcdist.train.compare`)."""
