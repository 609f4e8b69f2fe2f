"""Training: the loop (``loop.train``), what differs per process layout (``distributed``), the run's
log (``runlog``) and its directory and checkpoints (``checkpoints.RunDir``)."""
