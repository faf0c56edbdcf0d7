"""ckptavg: turn the saved checkpoints of a training run into better models by averaging them.

The library entry points live in :mod:`ckptavg.api`; the command line in :mod:`ckptavg.cli`.
"""

__version__ = "0.1.0"
