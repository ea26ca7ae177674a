"""Benchmark harness that measures OCI Distribution registries over HTTP."""
