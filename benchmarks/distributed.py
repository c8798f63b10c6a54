"""DDP helpers, re-exported from `ssl_common.distributed` (the layer below `methods/` and `benchmarks/`)."""

from ssl_common.distributed import gather_cat, gather_cat_nograd, is_distributed, rank, world_size  # noqa: F401
