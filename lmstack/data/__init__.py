"""The data pipeline: ingest, clean, dedup, tokenise into memory-mapped shards (`lmstack data prepare`)."""
