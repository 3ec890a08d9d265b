"""PyTorch model -> TVM: lowering (integer layers included), MetaSchedule tuning, CUDA."""
