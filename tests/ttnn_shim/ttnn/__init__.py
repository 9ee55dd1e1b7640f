"""`import ttnn` gives the emulator (tests/ttnn_emulator.py) in a process started with
PYTHONPATH=tests/ttnn_shim:<repo root>: how tests run the services' ttnn path as real processes."""

import sys

from tests import ttnn_emulator

sys.modules[__name__] = ttnn_emulator
