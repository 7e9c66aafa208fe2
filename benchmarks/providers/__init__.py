"""Benchmark providers: each builds one implementation of a projection from the same random parameters."""
