"""Benchmarks run against the team's labelled data (../shared/data), never shipped data."""
