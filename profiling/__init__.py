"""Nsight Systems capture ranges, NVTX ranges and torch.profiler windows for lmtrain runs."""
