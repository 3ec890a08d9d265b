"""Stands in for PyTorch in MetaSchedule's worker processes, which find this folder first on
their ``PYTHONPATH`` (``autocomp.hardware.compile.tune``): TVM's FFI imports PyTorch whenever
it can (5 s of each worker's start here), and the workers only build and time kernels."""

raise ImportError("PyTorch is kept out of autocomp's MetaSchedule workers")
