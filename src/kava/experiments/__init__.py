"""Experiments layer: sweeps over configs run here, on SLURM or PBS (``sweep``), reports that
aggregate runs and check the paper's claims (``report``), and the embedded CPU demo
(``demo``). Imports ``kava.training`` (lazily, to run) and the layers below it."""
