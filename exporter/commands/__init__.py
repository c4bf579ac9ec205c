"""The commands, as peers: each builds a graph of the stages in exporter/stages and runs it."""
