"""What ``python -m fastbn bench`` prints: the legend, one table per case, the verdict
and the line that says whether the machine was quiet enough for the numbers to mean
anything.  Measurement lives in ``_bench``; this module only reads its results."""

import math

from ._bench import BYTES_MOVED
from ._bench import FLOOR as FLOOR_NAME

# A machine is called noisy past any of these.
SPREAD_LIMIT_PCT = 10.0  # IQR of a fastbn or floor row, percent of its median
DRIFT_LIMIT_PCT = 15.0  # bandwidth at the end against the start
FLOOR_MISMATCH_PCT = 25.0  # a case's copy floor against the bandwidth probes
OTHERS_LIMIT = 0.10  # CPU time other processes took, fraction of all CPUs
STEAL_LIMIT = 0.05  # CPU time the hypervisor gave to other guests

LEGEND = """\
How to read the tables: every contender of a case runs in one process, interleaved
(each repeat runs all of them once, in a rotated order, each sample right after an
untimed call of the same contender); the numbers are medians over the repeats.
  median ms  time per call
  IQR %      spread: interquartile range of the repeats as a percent of the median
             (above {spread:.0f}% on a fastbn or floor row, the machine is called noisy)
  GB/s       the least bytes the op must move, over its median time: 2 array sizes for
             forward, inference and standardize (read x, write y), 3 for backward (read
             x and dy, write dx), 1 for stats (read x)
  / floor    time over the memory floor, a parallel copy of x on all threads (one read
             and one write of every byte); below 1 only for an op that moves less than a
             copy (stats reads x once) or a cache-resident case; anywhere else it is
             noise (the verdict flags it)
  / pattern  fastbn's time over its pattern floor: the least traffic its kernel path
             must move, on the same schedule, timed with no arithmetic (README,
             Performance); 1.00 means as fast as that traffic allows.  The pattern floor
             is a timed kernel with its own spread, so a ratio a little below 1 means
             "at the floor"; the verdict flags one below 1 by more than the two spreads
  / fastbn   a row's time over fastbn's call of the same op: 5.00 means fastbn ran 5x
             faster than that peer, 0.80 that the peer was faster""".format(
    spread=SPREAD_LIMIT_PCT)


def _num(value, fmt):
    return "" if value is None or math.isnan(value) else format(value, fmt)


def case_title(result):
    shape = tuple(result["shape"])
    return f"{result['case']} {shape} {result['dtype']}"


def format_case(result):
    """One case's table: a row per contender (columns in ``LEGEND``)."""
    rows = result["rows"]
    width = max(len(r["contender"]) for r in rows)
    calls = result.get("calls_per_sample", 1)
    per = f" of {calls} calls each, per call" if calls > 1 else ""
    head = (f"{case_title(result)}, axis={result['axis']}, {result['bytes'] / 1e6:.1f} MB "
            f"(median of {result['repeats']} interleaved repeats{per})")
    llc = result.get("llc_bytes")
    if llc and not result.get("cache_resident") and 2 * result["bytes"] <= llc:
        head += (f"\n  x and y ({2 * result['bytes'] / 1e6:.0f} MB) fit in this machine's "
                 f"{llc >> 20} MiB last-level cache: every row runs partly from cache")
    lines = [head, f"  {'contender':<{width}}  {'median ms':>10}  {'IQR %':>6}  {'GB/s':>7}  "
                   f"{'/ floor':>8}  {'/ pattern':>9}  {'/ fastbn':>8}"]
    for r in rows:
        lines.append(f"  {r['contender']:<{width}}  {r['median_ms']:10.4f}  "
                     f"{r['iqr_pct']:6.1f}  {r['GB/s']:7.1f}  {r['x_floor']:8.2f}  "
                     f"{_num(r['x_pattern_floor'], '9.2f'):>9}  "
                     f"{_num(r['x_fastbn'], '8.2f'):>8}")
    mem = ", ".join(f"{k} {v:.3f}" for k, v in result["memory"].items())
    lines.append(f"  peak traced allocation per call, in input sizes: {mem}")
    return "\n".join(lines)


def _baseline_row(rows, op):
    ours = [r for r in rows if r["op"] == op and r["contender"].startswith("fastbn")]
    return ours[0] if ours else None


def _row(rows, contender):
    return next(r for r in rows if r["contender"] == contender)


def verdict_lines(results):
    """Per case and op: fastbn's ratio to the copy floor and to its pattern floor, and
    each peer's time over fastbn's."""
    lines = ["Verdict (medians; floor ratios: lower is better; a peer's number is its time "
             "over fastbn's first call of the op, above 1 when that is faster):"]
    for result in results:
        rows = result["rows"]
        ops = [op for op in dict.fromkeys(r["op"] for r in rows) if op != "floor"]
        lines.append(f"  {case_title(result)}")
        width = max((len(op) for op in ops), default=0)
        for op in ops:
            ours = _baseline_row(rows, op)
            if ours is None:
                continue
            # peers, and fastbn's other calls of the op (allocating, unfused, ...)
            peers = [r for r in rows if r["op"] == op and r is not ours]
            text = f"{ours['x_floor']:.2f}x floor"
            floor = _row(rows, FLOOR_NAME)
            if (BYTES_MOVED[op] >= 2 and not result.get("cache_resident")
                    and ours["x_floor"] < 1.0 - (ours["iqr_pct"] + floor["iqr_pct"]) / 100):
                text += " (below the copy floor, which moves no more bytes: noise)"
            if not math.isnan(ours["x_pattern_floor"]):
                text += f", {ours['x_pattern_floor']:.2f}x pattern"
                floor_row = _row(rows, ours["pattern_floor"])
                if (ours["x_pattern_floor"] < 1.0 - (ours["iqr_pct"] + floor_row["iqr_pct"]) / 100):
                    text += " (below its pattern floor by more than the spreads: " \
                            "the floor's schedule is not the fastest one here)"
            if peers:
                text += "; " + ", ".join(f"{r['contender']} {r['x_fastbn']:.2f}" for r in peers)
            lines.append(f"    {op:<{width}}  {text}")
    return lines


def noise_assessment(results, probes, load):
    """``(noisy, reasons, facts)``: whether spreads, the copy floors against the bandwidth
    probed at the start and end of the run, or other processes say the numbers are noise."""
    reasons, facts = [], []
    start, end = probes
    facts.append(f"memory bandwidth {start['GB/s']:.1f} GB/s at the start, {end['GB/s']:.1f} "
                 f"at the end (parallel copy of {start.get('bytes', 64 << 20) / 1e6:.0f} MB)")
    drift = 100 * abs(end["GB/s"] - start["GB/s"]) / max(end["GB/s"], start["GB/s"])
    if drift > DRIFT_LIMIT_PCT:
        reasons.append(f"the bandwidth moved {drift:.0f}% between the start and the end")
    expected = (start["GB/s"] + end["GB/s"]) / 2
    floors = []
    for result in results:
        if result.get("cache_resident"):
            continue
        floor = next(r for r in result["rows"] if r["op"] == "floor")
        floors.append(floor["GB/s"])
        off = 100 * abs(floor["GB/s"] - expected) / expected
        if off > FLOOR_MISMATCH_PCT:
            reasons.append(f"{case_title(result)}'s copy floor ran at {floor['GB/s']:.1f} GB/s "
                           f"against {expected:.1f} probed")
    if floors:
        facts.append(f"the cases' copy floors at {min(floors):.1f}-{max(floors):.1f} GB/s")
    spreads = [(r["iqr_pct"], f"{case_title(result)}: {r['contender']}")
               for result in results for r in result["rows"]
               if r["op"] == "floor" or r["contender"].startswith("fastbn")]
    worst = max(spreads) if spreads else (0.0, "")
    facts.append(f"spreads at most {worst[0]:.1f}%")
    if worst[0] > SPREAD_LIMIT_PCT:
        many = sum(s > SPREAD_LIMIT_PCT for s, _ in spreads)
        reasons.append(f"{many} of {len(spreads)} fastbn and floor rows spread more than "
                       f"{SPREAD_LIMIT_PCT:.0f}% (worst {worst[0]:.0f}%, {worst[1]})")
    if load is not None:
        facts.append(f"other processes took {100 * load['others']:.0f}% of the CPUs"
                     + (f", the hypervisor stole {100 * load['steal']:.0f}%"
                        if load["steal"] >= 0.005 else ""))
        if load["others"] > OTHERS_LIMIT:
            reasons.append(f"other processes took {100 * load['others']:.0f}% of the CPUs")
        if load["steal"] > STEAL_LIMIT:
            reasons.append(f"the hypervisor gave {100 * load['steal']:.0f}% of the CPUs' time "
                           "to other machines")
    return bool(reasons), reasons, facts


def noise_line(results, probes, load):
    """The run's last line: quiet (the ratios are results) or noisy (and why)."""
    noisy, reasons, facts = noise_assessment(results, probes, load)
    if noisy:
        facts = [f for f in facts if f not in reasons]
        return ("Machine: NOISY, do not read these numbers as results: " + "; ".join(reasons)
                + ". (" + "; ".join(facts) + ".) Rerun when the machine is idle.")
    return "Machine: quiet (" + "; ".join(facts) + "): the ratios above are results."
