"""Neural teleportation (Armenta et al. 2021/2023) on the neuron structure.

- :mod:`~pipeline.teleport.cob`: the change of basis (one nonzero factor per hidden neuron),
  sampling, composition, the per-parameter scaling ``D``, closed-form recovery;
- :mod:`~pipeline.teleport.network`: teleporting a network in place (parameters, modified
  activations / max-pools / BatchNorms through fx, SGD momentum buffers);
- :mod:`~pipeline.teleport.training`: the ``D^-2`` preconditioner that trains a stock model as
  its teleported twin, the ``train_run`` callback, pseudo-teleportation and same-distribution
  controls;
- experiments: :mod:`~pipeline.teleport.micro` (Fig. 4),
  :mod:`~pipeline.teleport.interpolation` (Fig. 5), :mod:`~pipeline.teleport.validation` (Fig. 6
  table), :mod:`~pipeline.teleport.statistics` (Fig. 7), :mod:`~pipeline.teleport.histograms`
  (Fig. 11);
- :mod:`~pipeline.teleport.tables`: the experiments from a study spec, one call per rule.
"""
