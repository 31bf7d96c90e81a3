"""Metrics shared by methods and benchmarks (pure functions on tensors)."""
