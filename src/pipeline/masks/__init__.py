"""Functional modularity with differentiable weight masks (Csordas et al., ICLR 2021).

A trained network's weights are frozen; for each subtask a binary mask over its weights is
learned, one logit per masked weight, by hard Gumbel-sigmoid sampling with a straight-through
gradient and a regulariser pushing the logits down, so only the weights the subtask needs stay.
Comparing the masks of different subtasks says whether the network solves them with separate
weights (specialisation) or shared ones (reuse).

- :mod:`~pipeline.masks.layers`: which parameters are masked, and their role (input / hidden /
  output layer) read from the neuron structure;
- :mod:`~pipeline.masks.sampling`: logits, sampling, the deterministic mask;
- :mod:`~pipeline.masks.batched`: the network under K mask samples in one batched call;
- :mod:`~pipeline.masks.views`: the data of a subtask;
- :mod:`~pipeline.masks.train`: mask training; :mod:`~pipeline.masks.transfer`: permuted-input
  transfer (weights and masks trained together);
- :mod:`~pipeline.masks.evaluate`: masked accuracy, inverse-mask and half-mask tests;
- :mod:`~pipeline.masks.overlap`: sharing, IoU, remaining weights, stability (set arithmetic);
- :mod:`~pipeline.masks.removal`: class-removal confusion differences;
- :mod:`~pipeline.masks.controls`: the copy-weight control of double addition;
- :mod:`~pipeline.masks.study`: a trained run directory in, mask files and tables out.
"""
