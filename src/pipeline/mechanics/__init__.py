"""Neural mechanics (Kunin et al., ICLR 2021): conservation laws of training, measured against
their theoretical predictions. The metrics are registered in :mod:`pipeline.mechanics.metrics`;
they read stored artifacts only (numpy + h5py), never torch."""
