"""The unified profile store: tables, engine, ingestion of Segment payloads, identity resolution,
derived carts and orders. Knows nothing about audiences or channels' providers."""
