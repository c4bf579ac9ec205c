"""The command line: parse, call a command, render, map errors to exit codes."""
