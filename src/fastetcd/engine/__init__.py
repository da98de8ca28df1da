"""The engine: the single-writer state machine over the MVCC core and a durable store."""
