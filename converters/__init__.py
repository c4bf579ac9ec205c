"""The boundary to llama.cpp: the vendored converter scripts, the quantizer and the runtime.

Everything that touches llama.cpp code runs here, and everything that can crash natively runs in a
child process, so a crash becomes an error and not a dead command.
"""
