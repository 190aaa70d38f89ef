"""Data: reading and validating sources, splitting, mixing, dedup/overlap, sample data."""
