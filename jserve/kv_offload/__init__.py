"""The host tier of the KV cache: evicted prefix pages kept in host memory and copied back instead of recomputed.

``host_tier``: the host pages (an LRU keyed by page hash, numpy pools, checksums). ``transfer``: the gather and
scatter of pages in the device's KV buffers. ``page_mover``: those as programs built before ready, per stage and
bucketed page count. ``offloader``: the engine's per-step batch of copies. The page pool's side (what to copy)
is ``jserve.engine.kv_cache``.
"""
