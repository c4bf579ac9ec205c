"""Runs a graph of stages: the run object (lock, stage cache, timings, provenance), the stage graph and
its executors (in-process, a budgeted local pool, Ray), stage keys, pre-flight checks and memory estimates."""
