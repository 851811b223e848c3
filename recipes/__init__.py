"""Training recipes built on :mod:`lightning_dopt` (not part of the installed package)."""
