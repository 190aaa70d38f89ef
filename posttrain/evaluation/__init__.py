"""Evaluation: scoring, suites, benchmarks, statistics, decoding, the promotion gate."""
