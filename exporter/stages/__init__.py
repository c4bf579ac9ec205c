"""The stages every command is built from: each a function from typed inputs to a typed record with
one content key, run through `Run.stage` (get-or-build, link, time, record). A stage knows nothing of
the command that runs it."""
