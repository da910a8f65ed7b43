"""`nvfp4-convert bench` on the CPU: the table, the CSV and the speedup column."""

from __future__ import annotations

import csv

from nvfp4_convert.bench import FIELDS, run_bench


def test_cpu_bench_rows_and_csv(tmp_path):
    lines = []
    results = run_bench(device="cpu", backends=["cpu"], shapes=[(64, 256), (3, 4096)], repeats=2,
                        csv_path=tmp_path / "bench.csv", out=lines.append)
    rows = {(r["backend"], r["rows"], r["cols"]): r for r in results}
    assert set(rows) == {("reference", 64, 256), ("reference", 3, 4096), ("cpu", 64, 256), ("cpu", 3, 4096)}
    for r in rows.values():
        assert r["gbps"] > 0 and r["median_s"] > 0 and r["timing"] == "wall clock"
        assert r["speedup_vs_reference"] > 0 and r["reference_basis"] == "measured"
    assert rows[("reference", 64, 256)]["speedup_vs_reference"] == 1.0
    assert lines[0].startswith("nvfp4 quantize benchmark: cpu") and any(line.startswith("cpu ") for line in lines)
    with (tmp_path / "bench.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert list(written[0]) == FIELDS and len(written) == 4


def test_cpu_scales_bench_times_each_mode_against_rtn():
    from nvfp4_convert.bench import run_scales_bench

    lines = []
    results = run_scales_bench(device="cpu", backends=["cpu"], shapes=[(32, 256)], repeats=1, out=lines.append)
    (row,) = results
    assert row["backend"] == "cpu" and row["rtn_s"] > 0
    for mode in ("mse", "mse-weighted"):
        assert row[f"{mode}_s"] > 0 and row[f"{mode}_vs_rtn"] == row[f"{mode}_s"] / row["rtn_s"]
    assert lines[0].startswith("block-scale search cost on cpu") and lines[-1].startswith("cpu ")
