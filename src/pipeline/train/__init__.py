"""Training, for every science: the one engine every training runs on
(:mod:`~pipeline.train.engine`: tasks, callbacks, resume states, divergence), a pipeline run
on it (:mod:`~pipeline.train.loop`: ``train_run``, resumable after a kill) with the per-step
mechanics trace (:mod:`~pipeline.train.trace`) as a callback, optimizers, learning-rate
schedules and losses (:mod:`~pipeline.train.optim`), checkpoint schedules
(:mod:`~pipeline.train.schedule`), a run's device, data and model (:mod:`~pipeline.train.setup`),
stop requests (:mod:`~pipeline.train.stop`), pruning masks and lottery levels
(:mod:`~pipeline.train.pruning`), and a run trained with the extensions the sciences register
(:mod:`~pipeline.train.extensions`: ``train``, what the workflow's training jobs call)."""
