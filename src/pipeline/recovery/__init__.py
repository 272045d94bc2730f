"""Expand-and-Cluster (Martinelli et al., ICML'24): recover a teacher network's weights and
width from its input-output behaviour.

1. :mod:`~pipeline.recovery.teachers`: toy teachers (seeded MLPs) or trained runs, probed on
   inputs from a distribution or a dataset; a held-out probe set for evaluation.
2. :mod:`~pipeline.recovery.students`: *expand*: N overparameterised students (width x rho)
   trained on the teacher's outputs with MSE in one vectorised program (stacked parameters,
   batched matmuls, a batched Adam with one learning rate per student).
3. :mod:`~pipeline.recovery.cluster`: *cluster*, per hidden layer: canonicalise each neuron's
   incoming vector by its activation's symmetry, average-linkage clustering, keep the big and
   tight clusters; :mod:`~pipeline.recovery.collapse`: collapse each to one neuron, merge
   outgoing weights, finetune, layer by layer, and prune the neurons the result does not need.
4. :mod:`~pipeline.recovery.evaluate`: inferred widths and neuron-wise distances to the teacher.

:mod:`~pipeline.recovery.study` holds the file-to-file stages the workflow runs (expand,
cluster, the students' lottery, the toy family); :mod:`~pipeline.recovery.lottery` the pruning
control on the stacked students (with the core's masks and levels,
:mod:`pipeline.train.pruning`). The networks are fully connected chains
(:mod:`~pipeline.recovery.chain`), read from the neuron structure of the registered ``mlp``
model.
"""
