"""The expert store (issue 13): routed experts on disk (TensorStore zarr3, one chunk per expert),
a host-memory cache and a fixed number of device slots per MoE layer.

  layout.py   manifest, config digest, expert shapes and the checkpoint leaves that hold experts (pure)
  disk.py     ExpertStore: open + validate a store, read experts by id (async-capable)
  writer.py   write a store: from arrays, from a checkpoint, or randomly initialised block by block
  cache.py    slot caches with LRU / LFU / group-LRU eviction, and the byte-bounded host cache
  simulate.py replay a routing trace through device slots, host cache and disk; hit rates and bytes
  slots.py    the device slot buffer: [slots, d, h] arrays updated in place from pinned host memory
  quant.py    the int8 fallback copy of an expert (per-row symmetric scales)
  slot_moe.py the MoE expert FFN over a slot buffer, bit-identical to the resident dropless path (pure JAX)
  levels.py   decode-time storage levels: slots + host cache + disk, lookahead prefetch thread, fallback, metrics
  accounting.py  hit rates per level and per layer, lookahead recall and wasted prefetch reads (the ledger)
  lookahead.py   router lookahead candidates (a beam over the hierarchical router)
  plot.py     the `generate --store --plot` PNG
"""
