"""A child that dies by SIGSEGV, the way llama.cpp does when it crashes natively."""

import ctypes

from converters.child import child_main


def _crash(request):
    ctypes.string_at(0)  # reads address 0: a real segmentation fault
    return {}


if __name__ == "__main__":
    child_main(_crash)
