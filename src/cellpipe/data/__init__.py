"""Data: decoding, source layouts, manifest, splits, crops, shards."""
