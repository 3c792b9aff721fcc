"""Benchmark harness: tasks, optimizer registry, runner, suite and reports."""
