"""postroom storage: one node's durable state (blobs, shard databases) and backups."""
