"""Foundations every other package may use: the error family, atomic writes, file hashes, fault
points, output locks and byte-size formatting. Imports nothing else of exporter."""
