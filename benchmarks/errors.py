"""The error types, re-exported from `ssl_common.errors` (the layer below `methods/` and `benchmarks/`)."""

from ssl_common.errors import *  # noqa: F401,F403
from ssl_common.errors import __all__  # noqa: F401
