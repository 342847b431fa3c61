"""The benchmark's verdict and its noisy-machine line, on made-up results."""

import math

from fastbn import _bench_report as report
from fastbn._bench import FLOOR, PIPELINED_READ_COPY


def _row(op, contender, ms, iqr=1.0, x_floor=1.0, x_pattern=float("nan"), pattern=None,
         x_fastbn=float("nan"), gbs=20.0):
    return {"op": op, "contender": contender, "median_ms": ms, "iqr_pct": iqr, "GB/s": gbs,
            "x_floor": x_floor, "x_pattern_floor": x_pattern, "pattern_floor": pattern,
            "x_fastbn": x_fastbn}


def _result(floor_gbs=20.0, iqr=1.0, x_pattern=1.05, cache_resident=False):
    rows = [
        _row("floor", FLOOR, 5.0, iqr=iqr, gbs=floor_gbs),
        _row("floor", PIPELINED_READ_COPY, 8.0, iqr=iqr),
        _row("forward", "fastbn forward (out=)", 8.0 * x_pattern, iqr=iqr, x_floor=1.6 * x_pattern,
             x_pattern=x_pattern, pattern=PIPELINED_READ_COPY, x_fastbn=1.0),
        _row("forward", "torch native_batch_norm.out", 40.0, iqr=30.0, x_floor=8.0,
             x_fastbn=5.0 / x_pattern),
    ]
    return {"case": "nchw", "shape": [32, 128, 56, 56], "axis": 1, "dtype": "float32",
            "bytes": 51_380_224, "cache_resident": cache_resident, "calls_per_sample": 1,
            "repeats": 11, "rows": rows, "memory": {"forward": 0.0}}


QUIET_PROBES = ({"GB/s": 20.5, "iqr_pct": 1.0}, {"GB/s": 19.8, "iqr_pct": 1.0})
IDLE = {"others": 0.01, "steal": 0.0}


def test_quiet_machine_says_the_ratios_are_results():
    noisy, reasons, facts = report.noise_assessment([_result()], QUIET_PROBES, IDLE)
    assert not noisy and reasons == []
    line = report.noise_line([_result()], QUIET_PROBES, IDLE)
    assert line.startswith("Machine: quiet") and "20.5 GB/s at the start, 19.8 at the end" in line
    # a peer's own spread (30% here) is not the machine's noise
    assert "spreads at most 1.0%" in line


def test_each_sign_of_noise_is_named():
    cases = {
        "spread": ([_result(iqr=25.0)], QUIET_PROBES, IDLE, "spread more than 10%"),
        "floor": ([_result(floor_gbs=9.0)], QUIET_PROBES, IDLE, "copy floor ran at 9.0 GB/s"),
        "drift": ([_result()], ({"GB/s": 20.0}, {"GB/s": 12.0}), IDLE, "bandwidth moved 40%"),
        "others": ([_result()], QUIET_PROBES, {"others": 0.9, "steal": 0.0},
                   "other processes took 90% of the CPUs"),
        "steal": ([_result()], QUIET_PROBES, {"others": 0.0, "steal": 0.2}, "hypervisor gave 20%"),
    }
    for name, (results, probes, load, expected) in cases.items():
        noisy, reasons, _ = report.noise_assessment(results, probes, load)
        assert noisy and any(expected in r for r in reasons), (name, reasons)
        line = report.noise_line(results, probes, load)
        assert line.startswith("Machine: NOISY, do not read these numbers as results"), name


def test_cache_resident_case_floor_is_not_compared_with_memory_bandwidth():
    small = _result(floor_gbs=200.0, cache_resident=True)
    noisy, _, _ = report.noise_assessment([small, _result()], QUIET_PROBES, IDLE)
    assert not noisy


def test_no_proc_stat_leaves_out_the_load_fact():
    noisy, _, facts = report.noise_assessment([_result()], QUIET_PROBES, None)
    assert not noisy and not any("other processes" in f for f in facts)


def test_verdict_gives_floor_pattern_and_peer_ratios():
    lines = report.verdict_lines([_result(x_pattern=1.05)])
    assert lines[1].strip() == "nchw (32, 128, 56, 56) float32"
    forward = lines[2]
    assert "1.68x floor, 1.05x pattern" in forward
    assert "torch native_batch_norm.out 4.76" in forward
    assert "below its pattern floor" not in forward


def test_verdict_flags_a_ratio_below_the_pattern_floor_beyond_the_spreads():
    assert "below its pattern floor" not in report.verdict_lines([_result(x_pattern=0.99)])[2]
    assert "below its pattern floor" in report.verdict_lines([_result(x_pattern=0.9)])[2]


def test_table_has_spread_column_and_blank_cells_for_missing_ratios():
    table = report.format_case(_result())
    header = table.splitlines()[1]
    assert "IQR %" in header and "/ pattern" in header
    floor_line = table.splitlines()[2]
    assert "nan" not in floor_line and math.isfinite(float(floor_line.split()[-3]))


def test_verdict_calls_a_ratio_below_the_copy_floor_noise_unless_cache_resident():
    for cache_resident, flagged in ((False, True), (True, False)):
        result = _result(cache_resident=cache_resident)
        result["rows"][2]["x_floor"] = 0.8
        line = report.verdict_lines([result])[2]
        assert ("below the copy floor" in line) is flagged, line
