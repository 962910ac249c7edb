"""Training: the loop with splits, cross-validation and model selection (``loop``), the
streaming mini-batches with read-ahead (``streaming``), augmentation (``augment``) and
the thumbnail-only baseline (``baseline``)."""
