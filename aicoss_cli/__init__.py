"""aicoss: train, predict, ensemble and benchmark multi-label image classifiers.

Importing this package must stay cheap (no torch): `aicoss --help` answers instantly.
"""

__version__ = "0.1.0"
