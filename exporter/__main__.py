"""`python -m exporter`: the edge-export command line."""

from exporter.cli.app import main

main()
