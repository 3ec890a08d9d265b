"""autocomp: hardware-aware automatic compression of PyTorch models."""

import os

# OpenMP threads that spin while waiting for work steal the CPU from TVM's timing workers
# and from each other: on a loaded 2-core machine the sensitivity pre-pass ran 15x slower
# with spinning (91.8 s) than without (6.6 s). Set before torch loads its OpenMP runtime;
# a value the user sets wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
