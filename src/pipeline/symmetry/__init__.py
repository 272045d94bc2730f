"""Group actions on parameters, built on the neuron structure, and the symmetry groups that
the conservation-law metrics read (translation, scale, rescale)."""
