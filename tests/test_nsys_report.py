"""tools/nsys_gemm_report.py and profiling.nsys_sqlite on real nsys exports and synthetic ones with known answers."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from lmtrain.errors import UserError
from lmtrain.profiling import nsys_sqlite as ns
from lmtrain.profiling.nsys_synth import write_export
from lmtrain.profiling.peaks import DTYPES, PEAKS, peaks_for_device_name
from lmtrain.tools import nsys_gemm_report as report


def gpukernsum_by_name(path: Path) -> dict[str, tuple[int, int]]:
    """Per kernel name (instances, total ns) from `nsys stats --report gpukernsum` CSV (rows split by grid)."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with open(path) as fh:
        for row in csv.DictReader(fh):
            out[row["Name"]][0] += int(row["Instances"])
            out[row["Name"]][1] += int(row["Total Time (ns)"])
    return {k: tuple(v) for k, v in out.items()}


def run(argv, capsys) -> tuple[int, str, str]:
    rc = report.run_tool(report.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("stem", ["mfu_2gpu_before", "perlmutter-cloverleaf-cuda"])
def test_kernel_totals_equal_nsys_stats(nsys_fixtures, stem):
    expected = gpukernsum_by_name(nsys_fixtures / f"{stem}_gpukernsum.csv")
    rows = ns.kernel_summary(ns.open_export(nsys_fixtures / f"{stem}.sqlite"))
    got = {r["name"]: (r["count"], r["total_ns"]) for r in rows}
    assert got == expected


def test_h100_fixture_gemms(nsys_fixtures, tmp_path, capsys):
    expected = gpukernsum_by_name(nsys_fixtures / "mfu_2gpu_before_gpukernsum.csv")
    out_json = tmp_path / "r.json"
    rc, out, err = run([nsys_fixtures / "mfu_2gpu_before.sqlite", "--json", out_json, "--csv", tmp_path / "r.csv",
                        "--markdown", tmp_path / "r.md"], capsys)  # fmt: skip
    assert rc == 0, err
    data = json.loads(out_json.read_text())
    kernels = {r["name"]: (r["count"], r["total_ns"]) for r in data["groups"]["kernel"]}
    nvjet = {k: v for k, v in expected.items() if k.startswith("nvjet_")}
    assert kernels == nvjet and len(nvjet) == 3  # flash-attention (cutlass inside) is not a GEMM
    assert not any("flash" in k for k in kernels)
    assert data["gemm_kernels"] == sum(c for c, _ in nvjet.values())
    # emit_nvtx ranges without shapes: GEMMs land in aten::addmm, their time sums to the GEMM total.
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    assert ranges["aten::addmm"]["count"] > 300
    assert sum(r["total_ns"] for r in ranges.values()) == data["gemm_time_ns"]
    assert "default reference" in data["peak_source"]
    assert {(p["device"], p["dtype"], p["peak_tflops"]) for p in data["peaks"]} == {
        (0, "bf16", 989.0),
        (1, "bf16", 989.0),
    }
    devices = {r["name"]: r["count"] for r in data["groups"]["device"]}
    assert sum(devices.values()) == data["gemm_kernels"] and len(devices) == 2
    assert "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN" in out
    assert "| `nvjet_tst_192x192" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.csv").read_text().startswith("group,name,dtypes,count,total_ns,avg_ns,median_ns")


def test_a100_fixture_has_no_gemms_and_lists_top_kernels(nsys_fixtures, capsys):
    rc, out, err = run([nsys_fixtures / "perlmutter-cloverleaf-cuda.sqlite"], capsys)
    assert rc == 2
    assert "no GEMM kernels" in err and "PdV_kernel" in err and "Traceback" not in err


def test_device_detection_from_target_info_gpu(nsys_fixtures):
    export = ns.open_export(nsys_fixtures / "perlmutter-cloverleaf-cuda.sqlite")
    args = report.build_parser().parse_args([str(export.path)])
    base, labels, notes = report.resolve_peaks(args, export, [3])
    assert base[3].key == "a100-sxm-80gb" and labels[3] == "3: NVIDIA A100-SXM4-80GB" and not notes
    assert report.peak_table(args, base, {"bf16", "fp32"}) == {
        (3, "bf16"): (312e12, 2.039e12),
        (3, "fp32"): (19.5e12, 2.039e12),
    }
    args = report.build_parser().parse_args([str(export.path), "--gpu", "gh200", "--peak-tbs", "1"])
    base, _, notes = report.resolve_peaks(args, export, [3])
    assert (
        report.peak_table(args, base, {"bf16"}) == {(3, "bf16"): (989e12, 1e12)} and "--gpu gh200" in notes[0]
    )


def test_minimal_column_export(nsys_fixtures, tmp_path, capsys):
    rc, _, err = run(
        [nsys_fixtures / "healthy_1pct.sqlite", "--json", tmp_path / "r.json", "--quiet"], capsys
    )
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["nsys_version"] == "2026.1.1.204"
    assert "NVIDIA H100 80GB HBM3" in data["peak_source"]
    assert {p["bandwidth"] for p in data["peaks"]} == {3.35e12}
    (row,) = data["groups"]["kernel"]
    assert row["name"].startswith("void cutlass::gemm_nn_128x128") and row["count"] == 200


@pytest.mark.parametrize("stem", ["ffn_nvtx_ctypes", "ffn_pynvtx0211"])
def test_cpu_nvtx_fixtures_match_nvtxsum(nsys_fixtures, stem, tmp_path, capsys):
    with open(nsys_fixtures / f"{stem}_nvtxsum.csv") as fh:
        expected = {
            (r["Range"], r["Style"]): (int(r["Instances"]), int(r["Total Time (ns)"]))
            for r in csv.DictReader(fh)
        }
    rows = ns.nvtx_summary(ns.open_export(nsys_fixtures / f"{stem}.sqlite"))
    assert {(r["name"], r["style"]): (r["count"], r["total_ns"]) for r in rows} == expected
    by_name = {r["name"]: r for r in rows}
    assert by_name["w1"]["parent"] == "FeedForward" and by_name["w1"]["depth"] == 2
    # No kernel table: the tool falls back to the NVTX summary and says how to get GEMMs.
    rc, out, err = run([nsys_fixtures / f"{stem}.sqlite", "--json", tmp_path / "n.json"], capsys)
    assert rc == 0, err
    assert "--trace=cuda" in out
    names = [r["name"] for r in json.loads((tmp_path / "n.json").read_text())["ranges"]]
    assert (
        names.index("step 0")
        < names.index("FeedForward")
        < names.index("w1")
        < names.index("w3")
        < names.index("w2")
    )


# ---------------------------------------------------------------------------------------------- synthetic


def test_emit_nvtx_shapes_give_flops_and_roofline(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=2, n_layers=2, with_sizes=True, gemm_tflops=500.0)
    rc, _, err = run([synth.path, "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["gemm_kernels"] == synth.gemm_kernels == 2 * 2 * 3
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    assert set(ranges) == set(synth.ffn_shapes)
    for name, (b, m, n, k) in synth.ffn_shapes.items():
        row = ranges[name]
        assert row["count"] == 4
        assert row["flops"] == pytest.approx(4 * 2 * b * m * n * k)
        assert row["bytes"] == pytest.approx(4 * 2 * (m * k + k * n + m * n))
        assert row["tflops"] == pytest.approx(500.0, rel=1e-3)
        ai = m * n * k / (m * k + k * n + m * n)
        assert row["ai"] == pytest.approx(ai)
        assert row["bound_tflops"] == pytest.approx(min(989.0, ai * 3.35e12 / 1e12))
        assert row["share_of_bound"] == pytest.approx(500.0 / row["bound_tflops"], rel=1e-3)
    layers = {r["name"]: r["count"] for r in data["groups"]["layer"]}
    assert layers == {"layers.0": 6, "layers.1": 6}


def test_backward_gemms_are_mapped_to_their_forward_range_through_seq(tmp_path, capsys):
    # Backward runs on the autograd thread with no user range open; `MmBackward0, seq = N` ties each
    # pair of gradient GEMMs to the forward op with seq N and so to its FeedForward/wN and layers.i.
    synth = write_export(tmp_path / "s.sqlite", steps=2, n_layers=2, backward=True, gemm_tflops=500.0)
    rc, _, err = run([synth.path, "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["gemm_kernels"] == synth.gemm_kernels == 2 * 2 * 3 * 3
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    assert set(ranges) == set(synth.ffn_shapes) | {f"{n} (backward)" for n in synth.ffn_shapes}
    for name, (b, m, n, k) in synth.ffn_shapes.items():
        forward, backward = ranges[name], ranges[f"{name} (backward)"]
        assert (forward["count"], backward["count"]) == (4, 8)
        assert (
            backward["flops"] == pytest.approx(2 * forward["flops"]) == pytest.approx(8 * 2 * b * m * n * k)
        )
        assert backward["tflops"] == pytest.approx(500.0, rel=1e-3)
    layers = {r["name"]: r["count"] for r in data["groups"]["layer"]}
    assert layers == {"layers.0": 18, "layers.1": 18}


def test_backward_seq_maps_to_the_latest_forward_op_before_it(tmp_path):
    # The seq counter is per thread: with backward on the forward thread (CPU), the ops of step k's
    # backward carry the seq that step k+1's first forward op gets. The mapping must pick the forward op
    # that ran last before the backward Function, in the same process.
    path = tmp_path / "seq.sqlite"
    write_export(path, steps=0)
    conn = sqlite3.connect(path)
    tid = 1 << 24 | 7
    events = [  # (start, end, text)
        (100, 900, "FeedForward/w1"), (110, 890, "aten::mm, seq = 5, op_id = 1, sizes = [[4, 2], [2, 8]]"),
        (1000, 1900, "FeedForward/w2"), (1010, 1890, "aten::mm, seq = 6, op_id = 2, sizes = [[4, 8], [8, 2]]"),
        (2000, 2900, "MmBackward0, seq = 6, op_id = 3"), (2010, 2890, "aten::mm, seq = 7, op_id = 4"),
        (3000, 3900, "MmBackward0, seq = 5, op_id = 5"), (3010, 3890, "aten::mm, seq = 7, op_id = 6"),
        (4000, 4900, "FeedForward/w1"), (4010, 4890, "aten::mm, seq = 7, op_id = 7"),
        (5000, 5900, "MmBackward0, seq = 7, op_id = 8"), (5010, 5890, "aten::mm, seq = 8, op_id = 9"),
    ]  # fmt: skip
    conn.executemany(
        'INSERT INTO NVTX_EVENTS (start, "end", eventType, text, globalTid) VALUES (?, ?, 59, ?, ?)',
        [(s, e, text, tid) for s, e, text in events],
    )
    launches = [
        (120, "fwd w1"),
        (1020, "fwd w2"),
        (2020, "bwd w2"),
        (3020, "bwd w1"),
        (4020, "next w1"),
        (5020, "next bwd w1: seq 7 also marks backward ops before, the forward op is the latest"),
    ]
    for corr, (start, _) in enumerate(launches, 1):
        conn.execute(
            "INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, 0, ?, ?, 3, 0)",
            (start, start + 5, tid, corr),
        )
        conn.execute(
            "INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL (start, \"end\", correlationId, globalPid, demangledName, "
            "shortName) VALUES (?, ?, ?, ?, 1, 4)", (start + 10, start + 10 + corr * 100, corr, 1 << 24)
        )  # fmt: skip
    conn.commit()
    export = ns.open_export(path)
    ns.gemm_kernels(export)
    ranges = {r["name"]: r["total_ns"] for r in ns.gemm_groups(export, "range")}
    assert ranges == {
        "FeedForward/w1": 100 + 500,
        "FeedForward/w2": 200,
        "FeedForward/w2 (backward)": 300,
        "FeedForward/w1 (backward)": 400 + 600,
    }


@pytest.mark.slow  # builds the model's arguments through torch
def test_model_config_shapes_without_emit_nvtx(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1, n_layers=2, tokens=2048, dim=256, hidden=768,
                         with_sizes=False)  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = {"model": {"preset": "tiny", "dim": 256, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 256},
           "data": {"sequence_length": 1024, "batch_size": 2}}  # fmt: skip
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    # Without shapes: times only.
    rc, _, err = run([synth.path, "--json", tmp_path / "a.json", "--quiet"], capsys)
    assert rc == 0, err
    assert all(r["flops"] is None for r in json.loads((tmp_path / "a.json").read_text())["groups"]["range"])
    rc, _, err = run([synth.path, "--run", run_dir, "--json", tmp_path / "b.json", "--quiet"], capsys)
    assert rc == 0, err
    # A trace whose ranges the config does not name says so.
    plain = write_export(tmp_path / "p.sqlite", steps=1, n_layers=1, range_style="plain")
    rc, out, err = run([plain.path, "--run", run_dir], capsys)
    assert rc == 0 and "matched no NVTX range holding GEMMs" in out
    data = json.loads((tmp_path / "b.json").read_text())
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    # tiny preset with dim 256: SwiGLU hidden = 256 * ceil(int(8 * 256 / 3) / 256) = 768; tokens 2 x 1024.
    assert ranges["FeedForward/w1"]["flops"] == pytest.approx(2 * 2 * 2048 * 768 * 256)
    assert ranges["FeedForward/w2"]["flops"] == pytest.approx(2 * 2 * 2048 * 256 * 768)
    assert ranges["FeedForward/w1"]["tflops"] == pytest.approx(500.0, rel=1e-3)
    assert "model config" in data["shapes_source"]


def test_sdpa_math_path_flops_from_the_model_config(tmp_path):
    cfg = {"model": {"preset": "tiny", "dim": 256, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 256},
           "data": {"sequence_length": 1024, "batch_size": 2}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    shapes, _ = report.model_range_shapes(tmp_path / "config.yaml", None)
    batch, m, n, k = shapes["Attention/sdpa"]
    flops, nbytes = ns.gemm_cost(batch, m, n, k)
    # Q K^T and P V for 2 sequences x 4 heads of 1024 tokens with head_dim 64, 2 bytes per element.
    assert flops == 2 * 4 * (2 * 1024 * 1024 * 64 + 2 * 1024 * 64 * 1024)
    assert nbytes == 2 * 4 * 2 * (
        (1024 * 64 + 64 * 1024 + 1024 * 1024) + (1024 * 1024 + 1024 * 64 + 1024 * 64)
    )
    assert report.model_range_shapes(tmp_path / "config.yaml", 4096)[0]["Attention/sdpa"][0] == 2 * 4 * 4


def test_gemm_dims_of_aten_ops():
    assert ns.gemm_dims("aten::mm", [[8, 4], [4, 16]]) == (1, 8, 16, 4)
    assert ns.gemm_dims("aten::addmm", [[16], [8, 4], [4, 16], [], []]) == (1, 8, 16, 4)
    assert ns.gemm_dims("aten::bmm", [[3, 8, 4], [3, 4, 16]]) == (3, 8, 16, 4)
    assert ns.gemm_dims("aten::linear", [[2, 8, 4], [16, 4], [16]]) == (1, 16, 16, 4)
    assert ns.gemm_dims("aten::matmul", [[2, 8, 4], [4, 16]]) == (1, 16, 16, 4)
    assert ns.gemm_dims("aten::add", [[2, 8], [2, 8]]) is None
    assert ns.parse_sizes(
        "aten::mm, seq = 3, op_id = 9, sizes = [[8, 4], [4, 16]], input_op_ids = [(1, 0)]"
    ) == [[8, 4], [4, 16]]
    assert ns.parse_sizes("aten::mm, seq = 3") is None


@pytest.mark.parametrize(
    "name, gemm",
    [
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize1x1x1_execute_segment_k_off",
            True,
        ),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", True),
        (
            "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x2x1_0_tnn_align8_warpspecialized",
            True,
        ),
        ("cutlass_80_tensorop_bf16_s16816gemm_bf16_128x128_32x4_tn_align8", True),
        ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", True),
        (
            "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>",
            False,
        ),
        ("void cutlass::Kernel2<cutlass_80_tensorop_fmha_forward_bf16>(Params)", False),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", False),
        ("void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4>", False),
    ],
)
def test_gemm_recognition(name, gemm):
    assert ns.is_gemm(name) is gemm


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path, capsys):
    rc, _, err = run([tmp_path / "nope.sqlite"], capsys)
    assert rc == 2 and "no such file" in err


def test_not_sqlite(tmp_path, capsys):
    p = tmp_path / "trace.nsys-rep"
    p.write_bytes(b"not a database at all")
    rc, _, err = run([p], capsys)
    assert rc == 2 and "not an SQLite file" in err and "nsys export --type sqlite" in err


def test_sqlite_but_not_nsys(tmp_path, capsys):
    p = tmp_path / "other.sqlite"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE users (id INTEGER)")
    rc, _, err = run([p], capsys)
    assert rc == 2 and "not an Nsight Systems export" in err


def test_no_kernel_table_and_no_nvtx(tmp_path, capsys):
    p = tmp_path / "osrt.sqlite"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
        c.execute("CREATE TABLE META_DATA_EXPORT (name TEXT, value TEXT)")
    rc, _, err = run([p], capsys)
    assert rc == 2 and "CUPTI_ACTIVITY_KIND_KERNEL" in err and "--trace=cuda" in err


def test_empty_capture_window(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1)
    with sqlite3.connect(synth.path) as c:
        c.execute("DELETE FROM CUPTI_ACTIVITY_KIND_KERNEL")
    rc, _, err = run([synth.path], capsys)
    assert rc == 2 and "is empty" in err and "capture window" in err


def test_unknown_device_keeps_the_time_tables_and_says_how_to_pass_peaks(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1, device_name="NVIDIA Quadro P1000")
    rc, out, err = run([synth.path, "--json", tmp_path / "a.json"], capsys)
    assert rc == 0, err
    assert "Quadro P1000" in out and "--gpu KEY" in out and "--peak-tflops T --peak-tbs B" in out
    data = json.loads((tmp_path / "a.json").read_text())
    row = data["groups"]["range"][0]
    assert row["tflops"] == pytest.approx(500.0, rel=1e-3) and row["pct_peak"] is None and row["count"] == 2
    # --peak-tflops alone: % of peak, no roofline bound (no bandwidth known), no traceback.
    rc, _, err = run([synth.path, "--peak-tflops", "125", "--json", tmp_path / "b.json", "--quiet"], capsys)
    assert rc == 0, err
    row = json.loads((tmp_path / "b.json").read_text())["groups"]["range"][0]
    assert row["pct_peak"] == pytest.approx(500.0 / 125, rel=1e-3) and row["bound_tflops"] is None
    rc, _, err = run([synth.path, "--peak-tflops", "125", "--peak-tbs", "0.9", "--json", tmp_path / "c.json",
                      "--quiet"], capsys)  # fmt: skip
    assert rc == 0, err
    row = json.loads((tmp_path / "c.json").read_text())["groups"]["range"][0]
    assert row["bound_tflops"] == pytest.approx(min(125.0, row["ai"] * 0.9))


def test_bad_numbers_and_missing_run_config(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1)
    rc, _, err = run([synth.path, "--peak-tflops", "0", "--peak-bandwidth", "1"], capsys)
    assert rc == 2 and "--peak-tflops must be > 0" in err
    rc, _, err = run([synth.path, "--peak-tbs", "-1"], capsys)
    assert rc == 2 and "--peak-tbs must be > 0" in err
    rc, _, err = run([synth.path, "--tokens", "0"], capsys)
    assert rc == 2 and "--tokens" in err
    rc, _, err = run([synth.path, "--run", tmp_path], capsys)
    assert rc == 2 and "config.yaml" in err
    with pytest.raises(UserError):
        ns.nvtx_summary(ns.open_export(Path(__file__).parents[1] / "nonexistent.sqlite"))


def test_nvtx_mode_without_nvtx_table(nsys_fixtures, capsys):
    rc, _, err = run([nsys_fixtures / "healthy_1pct.sqlite", "--nvtx"], capsys)
    assert rc == 2 and "NVTX_EVENTS" in err


def test_model_config_file_with_extra_sections(tmp_path, capsys):
    synth = write_export(
        tmp_path / "s.sqlite", steps=1, n_layers=1, tokens=64, dim=256, hidden=768, with_sizes=False
    )
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {"sequence_length": 32, "batch_size": 2},
                                   "job": {"nodes": 1}}))  # fmt: skip
    rc, _, err = run([synth.path, "--model-config", exp, "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 0, err
    ranges = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["groups"]["range"]}
    assert ranges["FeedForward/w3"]["flops"] == pytest.approx(2 * 64 * 768 * 256)  # tiny: dim 256, SwiGLU 768
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: nope}\n")
    rc, _, err = run([synth.path, "--model-config", bad], capsys)
    assert rc == 2 and "nope" in err


def test_without_the_memdb_vfs_a_scratch_file_gives_the_same_report(tmp_path, monkeypatch):
    """SQLite before 3.36 has no memdb VFS: the parallel phase then shares a temporary file instead."""
    synth = write_export(tmp_path / "s.sqlite", steps=2, n_layers=2, backward=True)
    reports = []
    for vfs in ("memdb", "no-such-vfs"):
        monkeypatch.setattr(ns, "SCRATCH_VFS", vfs)
        export = ns.open_export(synth.path)
        assert ns.gemm_kernels(export) == synth.gemm_kernels
        reports.append({by: ns.gemm_groups(export, by) for by in ns.GROUPINGS})
        attached = {r[1] for r in export.conn.execute("PRAGMA database_list")}
        assert "w" not in attached, "the scratch database is detached afterwards"
    assert reports[0] == reports[1]
    assert any(r["name"] == "FeedForward/w1 (backward)" for r in reports[1]["range"])


# ------------------------------------------------------------------------------ kernel classes and dtypes

# Real kernel names as nsys, nvprof and the PyTorch profiler print them (public traces and reports).
KERNEL_NAMES = [
    # (family, name, class, dtype)
    ("cuBLAS gemmSN", "void gemmSN_NN_kernel<float, 256, 4, 2, 8, 4, 4, false, cublasGemvTensorStridedBatched<float const>, "
     "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float>>(cublasGemmSmallNParams<"
     "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float const>, "
     "cublasGemvTensorStridedBatched<float>, float>)", "gemm", "fp32"),
    ("cuBLAS gemmk1", "void gemmk1_kernel<int, float, 256, 5, true, false, false, false, cublasGemvTensorStridedBatched<float "
     "const>, cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float>, float, 0>"
     "(cublasGemmk1Params<float, cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float const>, "
     "cublasGemvTensorStridedBatched<float>, float, biasType<float, float>::type>)", "gemm", "fp32"),
    ("cuBLAS sgemm", "volta_sgemm_128x64_nn", "gemm", "fp32"),
    ("cuBLAS sgemm", "ampere_sgemm_128x64_tn", "gemm", "fp32"),
    ("cuBLAS volta", "volta_h884gemm_256x128_ldg8_nn", "gemm", "fp16"),
    ("cuBLAS maxwell", "maxwell_fp16_sgemm_fp16_64x64_nn", "gemm", "fp16"),
    ("cuBLAS ampere", "ampere_fp16_s16816gemm_fp16_64x64_sliced1x2_ldg8_relu_f2f_stages_64x6_tn", "gemm", "fp16"),
    ("cuBLAS ampere", "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "gemm", "bf16"),
    ("cuBLAS nvjet", "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "gemm", "bf16"),
    ("cuBLAS nvjet", "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNN", "gemm", "fp16"),
    ("cuBLAS nvjet", "nvjet_sm90_hss_64x8_64x16_1x1_h_bz_splitK_NNT", "gemm", "fp16"),
    ("cuBLAS xmma", "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"
     "_kernel__5x_cublas", "gemm", "fp16"),
    ("cuBLAS xmma", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize1x1x1_execute_segment_k_off",
     "gemm", "bf16"),
    ("cuBLAS xmma", "sm80_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x16_stage4_warpsize2x2x1_tensor16x8x8_kernel",
     "gemm", "tf32"),
    ("cuBLAS split-K", "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, "
     "false, false>(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, "
     "float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, void*, long, float*, int*)", "gemm", "bf16"),
    ("CUTLASS 2", "cutlass_80_tensorop_f16_s16816gemm_relu_f16_128x128_32x4_tn_align8", "gemm", "fp16"),
    ("CUTLASS 2", "void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_64x64_16x6_tn_align4>(cutlass_80_tensorop_s1688gemm_"
     "64x64_16x6_tn_align4::Params)", "gemm", "tf32"),
    ("CUTLASS 2", "cutlass_80_tensorop_bf16_s16816gemm_bf16_128x128_32x4_tn_align8", "gemm", "bf16"),
    ("CUTLASS 3", "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x2x1_0_tnn_align8_warpspecialized_"
     "cooperative_epi_tma", "gemm", "bf16"),
    ("CUTLASS 3", "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int, int>, "
     "cutlass::gemm::collective::CollectiveMma<cutlass::gemm::MainloopSm90TmaGmmaWarpSpecialized<4, cute::tuple<cute::C<2>, "
     "cute::C<1>, cute::C<1>>, cutlass::gemm::KernelTmaWarpSpecializedCooperative>, cutlass::bfloat16_t>>>"
     "(cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int, int>>::Params)", "gemm", "bf16"),
    ("TensorRT", "trt_ampere_h16816gemm_128x64_ldg8_nn_v1", "gemm", "fp16"),
    ("conv", "sm80_xmma_fprop_implicit_gemm_indexed_tf32f32_tf32f32_f32_nhwckrsc_nchw_tilesize128x128x16_stage4_warpsize2x2x1"
     "_g1_tensor16x8x8_kernel", "conv", "tf32"),
    ("conv", "sm86_xmma_dgrad_implicit_gemm_indexed_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize64x64x64_stage4_warpsize2x2x1_g1"
     "_tensor16x8x16_kernel", "conv", "fp16"),
    ("conv", "void implicit_convolve_sgemm<float, float, 1024, 5, 5, 3, 3, 3, 1, false, false, true>(int, int, int, float "
     "const*, int, float*, float const*, kernel_conv_params, unsigned long long, int, float, float, int, float const*, "
     "float const*, bool, int, int)", "conv", "fp32"),
    ("conv", "trt_turing_h1688cudnn_256x128_ldg8_relu_exp_small_nhwc_tn_v1", "conv", "fp16"),
    ("conv", "maxwell_scudnn_winograd_128x128_ldg1_ldg4_tile148n_nt", "conv", None),
    ("not", "sm50_xmma_pooling_coalescedC_NHWC_kMAX_3_False_execute_kernel_trt", None, None),
    ("not", "sm50_xmma_pooling_fw_4d_FP32FP32NHWC_Average_FastDiv_CAlign", None, None),
    ("not", "void cudnn::gemm::computeOffsetsKernel<false, false>(cudnn::gemm::ComputeOffsetsParams)", None, None),
    ("not", "compute_gemm_pointers(float2**, float2 const*, int, float2 const*, int, float2 const*, int, int)", None, None),
    ("not", "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false, cublasGemvParamsEx<int, "
     "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float const>, "
     "cublasGemvTensorStridedBatched<float>, float>>(float, float)", None, None),
    ("not", "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t, "
     "Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>, false, true, false, false, true, true, false>"
     "(Flash_fwd_params)", None, None),
    ("not", "fmha_cutlassF_f32_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<float, cutlass::arch::Sm80, "
     "true, 64, 64, 64, true, true>::Params)", None, None),
    ("not", "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
     "at::detail::Array<char*, 3>>(int, at::native::CUDAFunctor_add<float>, at::detail::Array<char*, 3>)", None, None),
]  # fmt: skip


@pytest.mark.parametrize(
    "family, name, cls, dtype", KERNEL_NAMES, ids=[f"{f}:{n[:40]}" for f, n, _, _ in KERNEL_NAMES]
)
def test_kernel_class_and_dtype_of_real_kernel_names(family, name, cls, dtype):
    assert ns.kernel_class(name) == cls
    if cls is not None:
        assert ns.kernel_dtype(name) == dtype


def test_at_least_eight_gemm_families_are_recognised():
    families = {f for f, _, cls, _ in KERNEL_NAMES if cls == "gemm"}
    assert len(families) >= 8, families


def test_gemm_pattern_adds_kernels_the_rule_does_not_know():
    name = "nvfuser_matmul_f0_c1_r0_g0"
    assert ns.kernel_class(name) is None
    assert ns.kernel_class(name, re.compile(r"nvfuser_matmul")) == "gemm"


# ------------------------------------------------------------------- TFLOP/s and % of peak, hand-computed


def _hand_rates(
    flops: float, seconds: float, elems: float, peak: float, bandwidth: float, bpe: int = 2
) -> dict:
    """TFLOP/s, % of peak and the roofline bound of kernels that all have the same shape."""
    ai = flops / (elems * bpe)
    return {
        "tflops": flops / seconds / 1e12,
        "pct_peak": flops / seconds / (peak * 1e12),
        "ai": ai,
        "bound_tflops": min(peak, ai * bandwidth / 1e12),
    }


def _check_row(row: dict, hand: dict) -> None:
    for key, value in hand.items():
        assert row[key] == pytest.approx(value, rel=1e-9), (row["name"], key)


def test_emit_nvtx_sizes_on_the_real_h100_trace_give_every_gemm_its_rate(nsys_fixtures, tmp_path, capsys):
    """The real 2-GPU export with emit_nvtx ranges, rewritten as if recorded with record_shapes=True."""
    path = tmp_path / "mfu_shapes.sqlite"
    shutil.copy(nsys_fixtures / "mfu_2gpu_before.sqlite", path)
    # (M, N, K) per GEMM kernel name, written into the `aten::addmm` range around each launch.
    shapes = {"nvjet_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": (8192, 3072, 1024),
              "nvjet_tst_192x208_64x4_1x1_h_bz_coopB_bias_TNT": (8192, 8192, 2048),
              "nvjet_tst_96x64_64x10_1x2_h_bz_bias_TNN": (512, 1024, 256)}  # fmt: skip
    conn = sqlite3.connect(path)
    kernels = conn.execute(
        'SELECT k.correlationId, k.globalPid, k."end" - k.start, s.value FROM CUPTI_ACTIVITY_KIND_KERNEL AS k '
        "JOIN StringIds AS s ON s.id = k.demangledName WHERE s.value LIKE 'nvjet%'"
    ).fetchall()
    launches = {(c, tid >> 24): (tid, s, e) for c, tid, s, e in conn.execute(
        'SELECT correlationId, globalTid, start, "end" FROM CUPTI_ACTIVITY_KIND_RUNTIME')}  # fmt: skip
    ranges = defaultdict(list)
    for tid, s, e, rowid, text in conn.execute(
        'SELECT globalTid, start, "end", rowid, text FROM NVTX_EVENTS WHERE eventType = 59 AND "end" IS NOT NULL'
    ):
        ranges[tid].append((s, e, rowid, text))
    # Brute force, independent of the tool: the innermost range around each kernel's launch call.
    per_kernel = defaultdict(lambda: [0, 0])  # name -> [shaped kernels, their ns]
    unshaped = 0
    for corr, pid, dur, name in kernels:
        launch = launches.get((corr, pid >> 24))
        if launch is None:
            unshaped += 1
            continue
        tid, start, end = launch
        s, e, rowid, text = max((r for r in ranges[tid] if r[0] <= start and r[1] >= end), key=lambda r: r[0])
        assert text.startswith("aten::addmm, seq = ")
        m, n, k = shapes[name]
        sizes = f", sizes = [[{n}], [{m}, {k}], [{k}, {n}], [], []]"
        conn.execute("UPDATE NVTX_EVENTS SET text = ? WHERE rowid = ?", (text + sizes, rowid))
        per_kernel[name][0] += 1
        per_kernel[name][1] += dur
    conn.commit()
    conn.close()
    assert unshaped == 2 and sum(c for c, _ in per_kernel.values()) == 335

    rc, out, err = run(
        [path, "--gpu", "h100-sxm", "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md"], capsys
    )
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    rows = {r["name"]: r for r in data["groups"]["kernel"]}
    assert set(rows) == set(shapes)
    for name, (m, n, k) in shapes.items():
        count, ns_total = per_kernel[name]
        hand = _hand_rates(
            count * 2.0 * m * n * k, ns_total / 1e9, count * (m * k + k * n + m * n), 989.0, 3.35e12
        )
        _check_row(rows[name], hand)
        assert rows[name]["dtypes"] == "bf16"
    addmm = {r["name"]: r for r in data["groups"]["range"]}["aten::addmm"]
    assert addmm["count"] == 335 and addmm["tflops"] is not None and addmm["pct_peak"] is not None
    # The two GEMMs without a launch call in the export have no range, so no shape: said in one line.
    assert "2 GEMM kernels" in out and "have no shape" in out
    assert data["shapes_source"] == "emit_nvtx record_shapes sizes (335 op ranges)"
    assert "| `nvjet_tst_192x192" in (tmp_path / "r.md").read_text()


def test_lmtrain_self_describing_ranges_need_no_flags(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=2, n_layers=2, range_style="lmtrain", gemm_tflops=400.0,
                         tokens=4096, dim=512, hidden=1536)  # fmt: skip
    rc, out, err = run([synth.path, "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert "lmtrain self-describing ranges" in data["shapes_source"] and "no shape" not in out
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    assert set(ranges) == set(synth.ffn_shapes)  # grouped by range name, without the shape text
    for name, (b, m, n, k) in synth.ffn_shapes.items():
        count = 2 * 2
        flops = count * 2.0 * b * m * n * k
        seconds = count * round(2 * m * n * k / 400e3) / 1e9
        _check_row(ranges[name], _hand_rates(flops, seconds, count * (m * k + k * n + m * n), 989.0, 3.35e12))
    (kernel,) = data["groups"]["kernel"]
    assert kernel["pct_peak"] == pytest.approx(400.0 / 989.0, rel=1e-3)
    assert {r["name"] for r in data["groups"]["layer"]} == {"layers.0", "layers.1"}
    assert all(r["tflops"] is not None for rows in data["groups"].values() for r in rows)
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert {"median_ns", "launch", "pct_peak", "bound_tflops", "ai", "dtypes"} <= set(header)


def test_a_script_of_ones_own_gets_rates_from_a_shapes_file(tmp_path, capsys):
    """A student's train.py with nvtx.annotate("w1") etc. and no shapes in the trace: --shapes gives them."""
    synth = write_export(tmp_path / "s.sqlite", steps=1, n_layers=2, range_style="plain", gemm_tflops=250.0,
                         tokens=2048, dim=256, hidden=768, device_name="NVIDIA A100-SXM4-80GB")  # fmt: skip
    rc, out, _ = run([synth.path, "--json", tmp_path / "a.json", "--quiet"], capsys)
    assert all(r["tflops"] is None for r in json.loads((tmp_path / "a.json").read_text())["groups"]["range"])
    shapes = tmp_path / "shapes.yaml"
    shapes.write_text(
        "- {range: w1, M: 2048, N: 768, K: 256, dtype: bf16}\n"
        "- {range: w3, M: 2048, N: 768, K: 256}\n"
        "- {range: w2, M: 2048, N: 256, K: 768}\n"
        "- {range: never_there, M: 1, N: 1, K: 1}\n"
    )
    rc, out, err = run([synth.path, "--shapes", shapes, "--json", tmp_path / "b.json"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "b.json").read_text())
    assert "entry 4 matched no NVTX range name ('never_there')" in out
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    for name, (m, n, k) in {"w1": (2048, 768, 256), "w3": (2048, 768, 256), "w2": (2048, 256, 768)}.items():
        count = 2
        seconds = count * round(2 * m * n * k / 250e3) / 1e9
        hand = _hand_rates(count * 2.0 * m * n * k, seconds, count * (m * k + k * n + m * n), 312.0, 2.039e12)
        _check_row(ranges[name], hand)
    # The same from --shape flags; a kernel-name pattern gives every kernel of that name the shape.
    rc, out, err = run([synth.path, "--shape", "w*=2048x768x256:bf16", "--shape", "nope=1x2x3",
                        "--json", tmp_path / "c.json"], capsys)  # fmt: skip
    assert rc == 0, err
    assert "--shape 'nope=1x2x3' matched no NVTX range or GEMM kernel name" in out
    ranges = {r["name"]: r for r in json.loads((tmp_path / "c.json").read_text())["groups"]["range"]}
    assert ranges["w1"]["tflop"] == pytest.approx(2 * 2 * 2048 * 768 * 256 / 1e12)
    rc, _, err = run([synth.path, "--shape", "nvjet_tst_*=4x2048x768x256", "--json", tmp_path / "d.json",
                      "--quiet"], capsys)  # fmt: skip
    assert rc == 0, err
    (kernel,) = json.loads((tmp_path / "d.json").read_text())["groups"]["kernel"]
    assert kernel["flops"] == pytest.approx(6 * 4 * 2.0 * 2048 * 768 * 256)


def test_pyprof_dict_ranges_carry_shapes_and_dtype(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1, n_layers=1, range_style="plain", gemm_tflops=100.0,
                         tokens=64, dim=32, hidden=96)  # fmt: skip
    marker = ("{'mod': 'torch.nn.functional', 'op': 'linear', 'args': [{'name': '', 'type': 'tensor', "
              "'shape': (64, 32), 'dtype': 'float32'}, {'name': '', 'type': 'tensor', 'shape': (96, 32), "
              "'dtype': 'float32'}]}")  # fmt: skip
    with sqlite3.connect(synth.path) as conn:
        conn.execute("UPDATE NVTX_EVENTS SET text = ? WHERE text = 'w1'", (marker,))
    rc, _, err = run([synth.path, "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    row = {r["name"]: r for r in data["groups"]["range"]}["torch.nn.functional.linear"]
    assert row["flops"] == pytest.approx(2.0 * 64 * 96 * 32)
    # The kernel's own name says bf16 (nvjet_tst): that, not the marker's fp32, picks peak and bytes.
    assert row["dtypes"] == "bf16" and row["bytes"] == pytest.approx(2 * (64 * 32 + 32 * 96 + 64 * 96))
    assert "pyprof/DLProf dict ranges" in data["shapes_source"]


def test_the_peak_follows_the_gemm_dtype(tmp_path, capsys):
    """An fp32 sgemm on an A100 is judged against 19.5 TFLOP/s, not the 312 of bf16; 4 bytes per element."""
    synth = write_export(tmp_path / "s.sqlite", steps=1, n_layers=1, gemm_tflops=15.0, gemm_name="ampere_sgemm_128x64_nn",
                         device_name="NVIDIA A100-SXM4-80GB", tokens=1024, dim=256, hidden=512)  # fmt: skip
    rc, _, err = run([synth.path, "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    for name, (_, m, n, k) in synth.ffn_shapes.items():
        row = {r["name"]: r for r in data["groups"]["range"]}[name]
        seconds = round(2 * m * n * k / 15e3) / 1e9
        _check_row(row, _hand_rates(2.0 * m * n * k, seconds, m * k + k * n + m * n, 19.5, 2.039e12, bpe=4))
        assert row["dtypes"] == "fp32"


# ------------------------------------------------------------------------------- damaged and odd exports


def test_truncated_export_is_a_one_line_error(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=4, n_layers=4)
    data = synth.path.read_bytes()
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(data[: len(data) // 2])  # a copy that stopped half-way
    rc, _, err = run([cut], capsys)
    assert rc == 2 and "damaged or truncated" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_overwritten_pages_are_a_one_line_error(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=4, n_layers=4)
    data = bytearray(synth.path.read_bytes())
    data[4096 * 2 : 4096 * 4] = b"\xff" * (
        4096 * 2
    )  # garbage over two pages: "database disk image is malformed"
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(bytes(data))
    rc, _, err = run([bad, "--quiet"], capsys)
    assert rc == 2 and "damaged or truncated" in err and "Traceback" not in err


def test_directory_lfs_pointer_and_nsys_rep(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    write_export(tmp_path / "run" / "trace.sqlite", steps=1)
    rc, _, err = run([tmp_path / "run"], capsys)
    assert rc == 2 and "a directory" in err and "trace.sqlite" in err
    pointer = tmp_path / "lfs.sqlite"
    pointer.write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 2686976\n"
    )
    rc, _, err = run([pointer], capsys)
    assert rc == 2 and "Git LFS pointer" in err and "git lfs pull" in err
    rep = tmp_path / "trace.nsys-rep"
    rep.write_bytes(b"\x00\x01 a binary Nsight Systems report")
    rc, _, err = run([rep], capsys)
    assert rc == 2 and "nsys export --type sqlite" in err and "trace.sqlite" in err


def test_export_without_meta_table_says_so(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1)
    with sqlite3.connect(synth.path) as conn:
        conn.execute("DROP TABLE META_DATA_EXPORT")
    rc, out, err = run([synth.path, "--json", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    assert "no META_DATA_EXPORT/EXPORT_META_DATA table" in out
    assert json.loads((tmp_path / "r.json").read_text())["nsys_version"] == "unknown"


def test_bad_shape_arguments_and_files(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1)
    cases = [
        (["--shape", "w1=8192x1536"], "expected PATTERN=MxNxK"),
        (["--shape", "w1=8x8x8:int4"], "unknown dtype 'int4'"),
        (["--shape", "w1=0x8x8"], "must be >= 1"),
        (["--shapes", tmp_path / "none.yaml"], "no such file"),
        (["--gemm-pattern", "("], "not a valid regular expression"),
    ]
    bad_files = {
        "a.yaml": ("{w1: 3}\n", "expected a list"),
        "b.yaml": ("- {range: w1, M: 2, N: 2}\n", "missing K"),
        "c.yaml": ("- {range: w1, kernel: x, M: 2, N: 2, K: 2}\n", "exactly one of 'range' or 'kernel'"),
        "d.yaml": ("- {range: w1, M: two, N: 2, K: 2}\n", "must be integers"),
        "e.yaml": ("- {range: w1, M: 2, N: 2, K: 2, flops: 3}\n", "unknown keys flops"),
        "f.yaml": ("- [unclosed\n", "not valid YAML"),
    }
    for name, (text, message) in bad_files.items():
        (tmp_path / name).write_text(text)
        cases.append((["--shapes", tmp_path / name], message))
    for argv, message in cases:
        rc, _, err = run([synth.path, *argv], capsys)
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)


def test_help_and_report_do_not_import_torch(tmp_path):
    synth = write_export(tmp_path / "s.sqlite", steps=1)
    script = Path(__file__).parents[1] / "tools" / "nsys_gemm_report.py"
    for argv in (["--help"], [str(synth.path), "--quiet"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(script), *argv], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "lmtrain.metrics" not in imported
        if argv == ["--help"]:
            assert (
                "--peak-tbs" in proc.stdout and "--shapes" in proc.stdout and "(default: 25)" in proc.stdout
            )


# ----------------------------------------------------------------------------------------- peaks table


def test_peak_table_covers_the_course_devices_and_names_them():
    names = {
        "Tesla V100-SXM2-16GB": "v100-sxm2", "Tesla V100-PCIE-32GB": "v100-pcie",
        "NVIDIA A100-SXM4-40GB": "a100-sxm-40gb", "NVIDIA A100-SXM4-80GB": "a100-sxm-80gb",
        "NVIDIA A100-PCIE-40GB": "a100-pcie-40gb", "NVIDIA A100 80GB PCIe": "a100-pcie-80gb",
        "NVIDIA A40": "a40", "NVIDIA L40S": "l40s", "NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H100 PCIe": "h100-pcie",
        "NVIDIA H100 NVL": "h100-nvl", "NVIDIA H200": "h200", "NVIDIA GH200 480GB": "gh200",
        "NVIDIA GH200 144G HBM3e": "gh200-144gb", "NVIDIA B200": "b200", "NVIDIA GeForce RTX 3090": "rtx3090",
        "NVIDIA GeForce RTX 4090": "rtx4090", "NVIDIA RTX A5000": "rtxa5000",
    }  # fmt: skip
    for name, key in names.items():
        assert peaks_for_device_name(name).key == key, name
    assert peaks_for_device_name("NVIDIA Quadro P1000") is None
    for peaks in PEAKS.values():
        assert set(peaks.peaks) == set(DTYPES) and peaks.bandwidth > 1e11
        assert peaks.tflops("fp32") and peaks.tflops("fp16")
    assert PEAKS["gh200"].tflops("bf16") == 989.0 and PEAKS["gh200"].bandwidth == 4.0e12


def test_peaks_agree_with_the_trainers_mfu_table():
    """The report and the training log's MFU must not disagree on a peak."""
    import torch

    from lmtrain.metrics import table_peak_tflops

    for name in (
        "NVIDIA GH200 480GB",
        "NVIDIA H200",
        "NVIDIA H100 PCIe",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-80GB",
    ):
        peaks = peaks_for_device_name(name)
        assert peaks.tflops("bf16") == table_peak_tflops(name, torch.bfloat16), name
        assert peaks.tflops("fp32") == table_peak_tflops(name, torch.float32), name


# --------------------------------------------------------------------------------------------- NVTX side


def test_nvtx_summary_groups_emit_nvtx_ops_without_their_ids(tmp_path):
    synth = write_export(tmp_path / "s.sqlite", steps=3, n_layers=2, backward=True)
    rows = {r["name"]: r for r in ns.nvtx_summary(ns.open_export(synth.path))}
    mm = [n for n in rows if n.startswith("aten::mm")]
    # One forward mm row per distinct shape (sizes stay in the key), one for the backward mm ops.
    assert all("op_id" not in n and "seq" not in n for n in rows)
    # Backward Functions run on the autograd thread: no range of the main thread encloses them.
    assert rows["MmBackward0"]["count"] == 3 * 2 * 3 and rows["MmBackward0"]["parent"] is None
    assert sum(rows[n]["count"] for n in mm) == 3 * 2 * 3 * 3
    assert rows["FeedForward/w1"]["parent"] == "layers.0" and rows["layers.0"]["parent"] == "forward"
    assert rows["step"]["count"] == 3 and rows["step"]["depth"] == 0 and rows["FeedForward/w1"]["depth"] == 3


def test_nvtx_summary_names_self_describing_ranges_without_their_shape(tmp_path):
    synth = write_export(tmp_path / "s.sqlite", steps=2, n_layers=1, range_style="lmtrain")
    rows = {r["name"]: r for r in ns.nvtx_summary(ns.open_export(synth.path))}
    assert {"FeedForward/w1", "FeedForward/w3", "FeedForward/w2"} <= set(rows)
    assert rows["FeedForward/w2"]["count"] == 2 and rows["FeedForward/w2"]["parent"] == "layers.0"


def test_gemm_label_round_trip_and_torch_dtypes():
    from lmtrain import nvtx

    assert nvtx.gemm_label("FeedForward/w1", 8192, 1536, 512, dtype="bf16") == (
        "FeedForward/w1 [gemm M=8192 N=1536 K=512 dtype=bf16]"
    )
    assert nvtx.parse_gemm_label("Attention/sdpa [gemm B=64 M=1024 N=1024 K=64 dtype=bf16]") == (
        "Attention/sdpa",
        (64, 1024, 1024, 64, "bf16"),
    )
    assert nvtx.parse_gemm_label("w1 [gemm M=8 N=8]") is None and nvtx.parse_gemm_label("w1") is None
    assert nvtx._dtype_name("torch.bfloat16") == "bf16" and nvtx._dtype_name(None) is None


# ------------------------------------------------------------------ committed exports, checked against nsys

FIXTURES = Path(__file__).parent / "fixtures" / "nsys"
FAMILIES = dict(
    steps=3, n_layers=2, range_style="lmtrain", tokens=4096, dim=1024, hidden=3072, gemm_tflops=400.0,
    split_k=True, device_id=1, gpus=((0, "NVIDIA GeForce RTX 4090"), (1, "NVIDIA H100 PCIe")),
    gemm_names={
        "FeedForward/w1": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize1x1x1_execute_segment_k_off",
        "FeedForward/w3": "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x2x1_0_tnn_align8_"
        "warpspecialized_cooperative_epi_tma",
        "FeedForward/w2": "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN",
    },
    extra_kernels=(
        "sm80_xmma_fprop_implicit_gemm_indexed_tf32f32_tf32f32_f32_nhwckrsc_nchw_tilesize128x128x16_stage4_warpsize2x2x1"
        "_g1_tensor16x8x8_kernel",
        "sm50_xmma_pooling_coalescedC_NHWC_kMAX_3_False_execute_kernel_trt",
        "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false, cublasGemvParamsEx<int, "
        "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float const>, "
        "cublasGemvTensorStridedBatched<float>, float>>(float, float)",
        "void cudnn::gemm::computeOffsetsKernel<false, false>(cudnn::gemm::ComputeOffsetsParams)",
        "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t, "
        "Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>, false, true, false, false, true, true, false>"
        "(Flash_fwd_params)",
    ),
)  # fmt: skip


def gpukernsum_rows(path: Path) -> dict[str, dict]:
    with open(path) as fh:
        return {r["Name"]: r for r in csv.DictReader(fh)}


def test_committed_families_export_is_what_its_recipe_writes(tmp_path):
    synth = write_export(tmp_path / "again.sqlite", **FAMILIES)
    query = 'SELECT k.start, k."end", k.deviceId, s.value FROM CUPTI_ACTIVITY_KIND_KERNEL AS k JOIN StringIds AS s ON s.id = k.demangledName ORDER BY 1'
    with sqlite3.connect(synth.path) as a, sqlite3.connect(FIXTURES / "families.sqlite") as b:
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_committed_families_export_against_nsys_stats_and_by_hand(tmp_path, capsys):
    path = FIXTURES / "families.sqlite"
    expected = gpukernsum_rows(FIXTURES / "families_gpukernsum.csv")
    got = {r["name"]: r for r in ns.kernel_summary(ns.open_export(path))}
    assert {n: (r["count"], r["total_ns"]) for n, r in got.items()} == {
        n: (int(r["Instances"]), int(r["Total Time (ns)"])) for n, r in expected.items()
    }
    rc, out, err = run([path, "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    kernels = {r["name"]: r for r in data["groups"]["kernel"]}
    gemm_names = set(FAMILIES["gemm_names"].values()) | {n for n in expected if "splitKreduce" in n}
    assert set(kernels) == gemm_names  # no conv, pooling, GEMV, cuDNN helper, flash-attention
    for name, row in kernels.items():
        assert row["count"] == int(expected[name]["Instances"]) and row["total_ns"] == int(
            expected[name]["Total Time (ns)"]
        )
        assert row["median_ns"] == float(expected[name]["Med (ns)"])
        grid = " x ".join(expected[name]["GridXYZ"].split()).replace(" x ", "x")
        block = "x".join(expected[name]["BlockXYZ"].split())
        assert row["launch"] == f"{grid} / {block}" and row["launches"] == 1
    assert "1 convolution kernel" not in out and "6 convolution kernels (1 name, " in out
    # The kernels ran on device 1, an H100 PCIe: its bf16 peak (756) and 2 TB/s, not the RTX 4090 of row 0.
    assert data["devices"] == {"1": "1: NVIDIA H100 PCIe"}
    assert {(p["device"], p["dtype"], p["peak_tflops"], p["bandwidth"]) for p in data["peaks"]} == {
        (1, "bf16", 756.0, 2.0e12)
    }
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    m, d, h = 4096, 1024, 3072
    for name, (n, k) in {
        "FeedForward/w1": (h, d),
        "FeedForward/w3": (h, d),
        "FeedForward/w2": (d, h),
    }.items():
        calls = 3 * 2
        # Each call: the GEMM at 400 TFLOP/s and a 3 us split-K reduction, counted with it (0 FLOPs).
        seconds = calls * (round(2 * m * n * k / 400e3) + 3_000) / 1e9
        hand = _hand_rates(calls * 2.0 * m * n * k, seconds, calls * (m * k + k * n + m * n), 756.0, 2.0e12)
        _check_row(ranges[name], hand)
        assert ranges[name]["count"] == 2 * calls
    assert all(
        r["tflops"] is not None and r["pct_peak"] is not None
        for r in data["groups"]["kernel"]
        if "splitK" not in r["name"]
    )
    markdown = (tmp_path / "r.md").read_text()
    assert "## GEMMs by NVTX range" in markdown and "| FeedForward/w1 |" in markdown


def test_committed_cpu_capture_of_lmtrain_against_nvtxsum(tmp_path, capsys):
    """A real nsys capture of lmtrain's smoke run with NVTX on: ranges and their self-describing shapes."""
    path = FIXTURES / "lmtrain_cpu_nvtx.sqlite"
    with open(FIXTURES / "lmtrain_cpu_nvtx_nvtxsum.csv") as fh:
        expected: dict = defaultdict(lambda: [0, 0])
        for r in csv.DictReader(fh):
            key = (ns.nvtx_group_name(r["Range"]), r["Style"])
            expected[key][0] += int(r["Instances"])
            expected[key][1] += int(r["Total Time (ns)"])
    rows = ns.nvtx_summary(ns.open_export(path))
    assert {(r["name"], r["style"]): [r["count"], r["total_ns"]] for r in rows} == dict(expected)
    with sqlite3.connect(path) as conn:
        texts = [t for (t,) in conn.execute("SELECT COALESCE(e.text, s.value) FROM NVTX_EVENTS AS e "
                                            "LEFT JOIN StringIds AS s ON s.id = e.textId")]  # fmt: skip
    from lmtrain.nvtx import parse_gemm_labels

    parsed = [parse_gemm_labels(t) for t in texts if t and " [gemm " in t]
    shapes = {name: groups[0] for name, groups in parsed if len(groups) == 1}
    # (batch, M, N, K, dtype): w1 maps dim -> hidden, w2 hidden -> dim.
    assert shapes["FeedForward/w1"][2:4] == (shapes["FeedForward/w2"][3], shapes["FeedForward/w2"][2])
    assert shapes["Attention/wq"][4] == "fp32"
    # Backward ran on the main thread (CPU): each linear's backward range, with dgrad and wgrad, inside it.
    (dgrad, wgrad) = next(groups for name, groups in parsed if name == "FeedForward/w1 (backward)")
    _, m, n, k, _ = shapes["FeedForward/w1"]
    assert dgrad[1:4] == (m, k, n) and wgrad[1:4] == (n, k, m)
    by_name = {r["name"]: r for r in rows}
    assert by_name["FeedForward/w1 (backward)"]["parent"] == "backward"
    rc, out, err = run([path, "--quiet", "--json", tmp_path / "n.json"], capsys)
    assert rc == 0, err
    assert "--trace=cuda" in json.loads((tmp_path / "n.json").read_text())["note"]


def test_long_kernel_names_are_cut_in_the_middle_and_stay_distinct():
    a = (
        "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<"
        + "x" * 80
        + "A"
        + "y" * 80
        + ">>(Params)"
    )
    b = a.replace("A", "B")
    short = report.shorten_names([a, b, "nvjet_tst_96x64_64x10_1x2_h_bz_bias_TNN"], 60)
    assert short[0] != short[1] and "…" in short[0]
    assert short[0].startswith("void cutlass::device_kernel") and short[0].endswith(">>(Params)")
    assert short[2] == "nvjet_tst_96x64_64x10_1x2_h_bz_bias_TNN"


def test_gemm_pattern_on_a_trace_of_unknown_matmul_kernels(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1, n_layers=1, gemm_name="nvfuser_matmul_f0_c1_r0_g0")
    rc, _, err = run([synth.path], capsys)
    assert rc == 2 and "no GEMM kernels" in err and "--gemm-pattern" in err
    rc, _, err = run(
        [synth.path, "--gemm-pattern", "nvfuser_matmul", "--json", tmp_path / "r.json", "--quiet"], capsys
    )
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["gemm_kernels"] == 3 and "bf16 (assumed)" not in data["notes"]
    assert any("taken as bf16" in n for n in data["notes"])  # the name gives no dtype


def test_lmtrain_ranges_with_emit_nvtx_attribute_backward_gemms_with_their_own_shapes(tmp_path, capsys):
    """profiling.emit_nvtx on top of the self-describing ranges: dgrad and wgrad of each linear run on the
    autograd thread, are tied to their forward range through seq and take the sizes of their own mm ops."""
    synth = write_export(tmp_path / "s.sqlite", steps=2, n_layers=2, range_style="lmtrain", backward=True,
                         gemm_tflops=300.0, tokens=2048, dim=512, hidden=1536)  # fmt: skip
    rc, _, err = run([synth.path, "--gpu", "h100-sxm", "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 0, err
    ranges = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["groups"]["range"]}
    assert set(ranges) == set(synth.ffn_shapes) | {f"{n} (backward)" for n in synth.ffn_shapes}
    for name, (_, m, n, k) in synth.ffn_shapes.items():
        forward, backward = ranges[name], ranges[f"{name} (backward)"]
        assert (forward["count"], backward["count"]) == (4, 8)
        assert backward["flops"] == pytest.approx(2 * forward["flops"]) == pytest.approx(8 * 2.0 * m * n * k)
        assert backward["pct_peak"] == pytest.approx(300.0 / 989.0, rel=1e-3)


def test_a_dtype_the_device_has_no_peak_for_is_said(tmp_path, capsys):
    synth = write_export(tmp_path / "s.sqlite", steps=1, n_layers=1, device_name="Tesla V100-SXM2-16GB")
    rc, out, err = run([synth.path, "--json", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    assert "V100 SXM2 has no bf16 peak in the table" in out  # an nvjet bf16 kernel judged on a V100
    row = json.loads((tmp_path / "r.json").read_text())["groups"]["kernel"][0]
    assert row["tflops"] is not None and row["pct_peak"] is None


def test_linear_layers_open_a_backward_range_around_their_gradient_gemms(monkeypatch):
    """The backward range of each linear layer is pushed and popped in order around its matmul node, and
    carries dgrad and wgrad with their own shapes."""
    import torch

    import lmtrain.nvtx as nvtx
    from lmtrain.config import ModelConfig
    from lmtrain.model import Transformer, model_args_from_config

    stack: list[str] = []
    pushed: list[str] = []

    def push(text: str) -> None:
        if " (backward)" in text:  # one layer's backward at a time: never inside another's
            assert not any(" (backward)" in t for t in stack), (text, stack)
        stack.append(text)
        pushed.append(text)

    monkeypatch.setattr(nvtx, "_enabled", True)
    monkeypatch.setattr(nvtx, "_push", push)
    monkeypatch.setattr(nvtx, "_pop", stack.pop)
    torch.manual_seed(0)
    args = model_args_from_config(ModelConfig(preset="tiny", dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                              multiple_of=32), vocab_size=61, seq_len=8)  # fmt: skip
    model = Transformer(args)
    model(torch.randint(0, 61, (2, 8))).float().pow(2).mean().backward()
    assert stack == []  # every range closed
    backward = [nvtx.parse_gemm_labels(t) for t in pushed if " (backward)" in t]
    names = sorted(name for name, _ in backward)
    per_layer = ["Attention/wk", "Attention/wo", "Attention/wq", "Attention/wv", "FeedForward/w1", "FeedForward/w2",
                 "FeedForward/w3"]  # fmt: skip
    assert names == sorted(f"{n} (backward)" for n in per_layer * 2)
    forward = dict(nvtx.parse_gemm_label(t) for t in pushed if " [gemm " in t and " (backward)" not in t)
    for name, (dgrad, wgrad) in backward:
        _, m, n, k, dtype = forward[name.removesuffix(" (backward)")]
        assert dgrad == (1, m, k, n, dtype) and wgrad == (1, n, k, m, dtype)
    with torch.no_grad():  # nothing recorded: no backward range
        pushed.clear()
        model(torch.randint(0, 61, (2, 8)))
    assert not any(" (backward)" in t for t in pushed)


def test_lmtrain_backward_ranges_alone_attribute_dgrad_and_wgrad(tmp_path, capsys):
    """No emit_nvtx: the backward thread's `FeedForward/wN (backward) [gemm ..] [gemm ..]` ranges carry both
    gradient GEMMs' shapes; each range's FLOPs are those of its two GEMMs, on its first kernel."""
    synth = write_export(tmp_path / "s.sqlite", steps=2, n_layers=2, range_style="lmtrain", backward=True,
                         lmtrain_backward=True, gemm_tflops=300.0, tokens=2048, dim=512, hidden=1536)  # fmt: skip
    rc, out, err = run([synth.path, "--gpu", "h100-sxm", "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    ranges = {r["name"]: r for r in data["groups"]["range"]}
    assert set(ranges) == set(synth.ffn_shapes) | {f"{n} (backward)" for n in synth.ffn_shapes}
    for name, (_, m, n, k) in synth.ffn_shapes.items():
        calls = 2 * 2
        seconds = 2 * calls * round(2 * m * n * k / 300e3) / 1e9
        hand = _hand_rates(
            2 * calls * 2.0 * m * n * k, seconds, 2 * calls * (m * k + k * n + m * n), 989.0, 3.35e12
        )
        _check_row(ranges[f"{name} (backward)"], hand)
    assert "no shape" not in out and all(r["tflops"] for r in data["groups"]["range"])


def test_report_benchmark_alternates_rounds_and_prints_the_speed_up_with_its_spread(capsys):
    from lmtrain.bench import main as bench_main

    assert bench_main(["nsys_report", "--kernels", "5000", "--sample", "50", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 1: SQL report" in out and "round 2: SQL report" in out
    assert re.search(r"speed-up of the SQL report over the naive loop: [\d.]+x \(rounds [\d.]+\.\.[\d.]+, "
                     r"CPU-time ratio [\d.]+\)", out)  # fmt: skip
