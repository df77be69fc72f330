"""Smoke tests of the benchmark harnesses: they run and report what they promise (not who wins)."""

import json

from benchmarks import init_time, kernels
from benchmarks import lobpcg as lobpcg_benchmark

KEYS = {"method", "seconds", "ratio_to_fwd_bwd", "decomposition_seconds", "peak_bytes", "stats_bytes"}


def test_init_time_smoke_preset_writes_the_promised_json(tmp_path):
    methods = ["filet", "filet_projected", "lora_da", "lora_ga", "kasa", "pissa", "peft_lora_ga", "peft_pissa",
               "peft_corda", "gaussian"]  # peft_eva cycles the loader for ~40 s on this data: run it in the benchmark
    out = tmp_path / "init.json"
    init_time.main(["--preset", "smoke", "--methods", ",".join(methods), "--json", str(out),
                    "--png", str(tmp_path / "init.png")])
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert [m["method"] for m in report["methods"]] == methods
    for row in report["methods"]:
        assert KEYS <= set(row)
        assert row["seconds"] > 0 and row["ratio_to_fwd_bwd"] > 0 and row["peak_bytes"] > 0
    by_name = {m["method"]: m for m in report["methods"]}
    assert by_name["filet_projected"]["stats_bytes"] < by_name["filet"]["stats_bytes"] / 10
    assert by_name["lora_ga"]["stats_bytes"] == report["target_weight_bytes"]  # a full gradient per layer
    assert (tmp_path / "init.png").stat().st_size > 0


def test_lobpcg_benchmark_runs_and_reports_accuracy():
    rows = lobpcg_benchmark.main(["--n", "128", "--k", "4", "--b", "2"])
    assert rows[0]["ours_residual"] < 1e-3 and rows[0]["torch_lobpcg_residual"] < 1e-2


def test_kernel_benchmark_runs_on_the_reference_backend():
    rows = kernels.main(["--d", "64", "--tokens", "256", "--basis", "16", "--dtype", "float32",
                         "--backends", "torch", "--repeats", "1"])
    assert {r["op"] for r in rows} == {"masked_syrk_", "masked_column_sumsq_", "masked_projected_energy_", "masked_outer_"}


def test_quality_benchmark_quick_mode_runs_every_method(tmp_path):
    from benchmarks import quality

    runs, rows = quality.main(["--quick", "--out", str(tmp_path)])
    assert list(rows) == quality.METHODS
    for run in runs:
        assert set(run["curve"]) == {0, 2, 4}
        for point in run["curve"].values():
            assert point["loss"] > 0 and 0 <= point["accuracy"] <= 1
    assert (tmp_path / "quality.png").stat().st_size > 0 and (tmp_path / "quality.md").exists()
