"""Analysis of profiles after the run: Nsight Systems SQLite exports, device peaks, synthetic exports.

    from lmtrain.profiling import nsys_sqlite
    nsys_sqlite.open_export("trace.sqlite")

This layer imports only the core (`lmtrain`). In a checkout it is the folder `profiling/` (linked as
`lmtrain/profiling`); installed, it is `lmtrain.profiling`. What runs inside a training job (NVTX
ranges, capture windows, the torch.profiler summary) belongs to the core: `lmtrain.nvtx`,
`lmtrain.profiler`, `lmtrain.torch_summary`. Add a new trace reader or analysis here.
"""
