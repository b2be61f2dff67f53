"""Training data: one in-memory record type (:mod:`training.data.records`) and readers that produce it."""
