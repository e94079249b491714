"""Moved to :mod:`storymem.evaluation.encoders`; this module keeps the old import path working."""

from .evaluation.encoders import *  # noqa: F401,F403
from .evaluation.encoders import __all__  # noqa: F401
