"""Command-line analysis tools, run as `lmtrain gemm-report|compare-runs|plot-loss|ablation-report` (also importable)."""
