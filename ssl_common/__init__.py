"""What `methods/` and `benchmarks/` both need, with no dependency on either: the error types
(`ssl_common.errors`), global-batch gathering under DDP (`ssl_common.distributed`), the typed-config
base models with their error messages (`ssl_common.typed`) and the clustering metrics
(`ssl_common.clustering_metrics`: the evaluation, the report's statistics and the methods' logs).
Layers point down only: reports -> benchmarks -> methods -> ssl_common."""
