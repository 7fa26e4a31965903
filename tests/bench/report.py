"""Headline numbers, targets, and the JSON / markdown / PNG outputs of the bench."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench import floor_report

HEADLINE = (
    *floor_report.KEYS,
    "ping_rps",
    "lease_calls_per_s",
    "lease_to_ping_ratio",
    "ping_p99_ms",
    "lease_p99_ms",
    "scale_p50_ratio",
    "handoff_p99_ms",
    "refill_1000_s",
    "idle_cpu_percent",
    "idle_db_statements_per_s",
    "two_process_speedup",
)

# (name, description, check(result) -> bool | None)
Target = tuple[str, str, Callable[[dict[str, Any]], bool | None]]


def _cmp(key: str, op: str, limit: float) -> Callable[[dict[str, Any]], bool | None]:
    def check(r: dict[str, Any]) -> bool | None:
        v = r.get(key)
        if v is None:
            return None
        return bool(v >= limit) if op == ">=" else bool(v <= limit)

    return check


TARGETS: list[Target] = [
    *(
        (f"{key} {op} {limit}", desc, _cmp(key, op, limit))
        for key, op, limit, desc in floor_report.LIMITS
    ),
    (
        "scale_p50_ratio <= 1.2",
        "Lease p50 beside 10k instances + 10k reservations vs alone",
        _cmp("scale_p50_ratio", "<=", 1.2),
    ),
    (
        "handoff_p99_ms <= 50",
        "instance ready -> waiting Lease returned, p99",
        _cmp("handoff_p99_ms", "<=", 50),
    ),
    (
        "refill_1000_s <= 10",
        "1,000 instances ready (boot_seconds 0) after server spawn",
        _cmp("refill_1000_s", "<=", 10),
    ),
    (
        "idle_cpu_percent <= 2",
        "server CPU, % of one core, 10k instances, no calls",
        _cmp("idle_cpu_percent", "<=", 2),
    ),
    (
        "idle_db_statements_per_s <= 5",
        "database transactions/s, 10k instances, no calls",
        _cmp("idle_db_statements_per_s", "<=", 5),
    ),
]


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, digits)


def headline(
    details: dict[str, Any], machine: dict[str, Any], quick: bool, failures: list[str]
) -> dict[str, Any]:
    ping_rps = _get(details, "ping", "64", "calls_per_s")
    lease_rps = _get(details, "lease", "64", "calls_per_s")
    two = _get(details, "two_process", "calls_per_s")
    result: dict[str, Any] = {
        "ping_rps": ping_rps,
        "lease_calls_per_s": lease_rps,
        "lease_to_ping_ratio": _ratio(lease_rps, ping_rps),
        "ping_p99_ms": _get(details, "ping", "64", "ping", "p99_ms"),
        "lease_p99_ms": _get(details, "lease", "64", "lease", "p99_ms"),
        "scale_p50_ratio": _ratio(
            _get(details, "scale", "big", "lease", "p50_ms"),
            _get(details, "scale", "small", "lease", "p50_ms"),
        ),
        "handoff_p99_ms": _get(details, "handoff", "ready_to_return", "p99_ms"),
        "refill_1000_s": _get(details, "refill", "seconds_from_spawn"),
        "idle_cpu_percent": _get(details, "idle", "server_cpu_percent"),
        "idle_db_statements_per_s": _get(details, "idle", "transactions_per_s"),
        "two_process_speedup": _ratio(two, lease_rps),
        **floor_report.headline(details),
        "machine": machine,
        "mode": "quick" if quick else "full",
        "definitions": {
            "concurrency": "ping_rps, lease_calls_per_s, ping_p99_ms, lease_p99_ms are at "
            "concurrency 64 (64 workers over 8 HTTP/2 connections)",
            "lease_calls_per_s": "Lease + Return calls completed per second by workers "
            "looping Lease -> Return (each counts as one call)",
            "handoff_p99_ms": "instances.ready_at (set by the reconciler) -> the waiting "
            "Lease's reply received by the client",
            "idle_db_statements_per_s": "pg_stat_database xact_commit + xact_rollback delta "
            "of the server's database (vmpool runs one statement "
            "per transaction on these paths)",
        },
        "failures": failures,
        "details": details,
    }
    result["targets"] = {name: check(result) for name, _, check in TARGETS}
    return result


def verdicts(result: dict[str, Any]) -> list[str]:
    lines = []
    for name, desc, _ in TARGETS:
        ok = result["targets"][name]
        word = "PASS" if ok else ("FAIL" if ok is not None else "NOT MEASURED")
        lines.append(f"{word}: {name} ({desc})")
    return lines


def top_frames(raw: Path, n: int = 25) -> list[dict[str, Any]]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_count: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
            if " (" in f
            else f
            for f in stack.split(";")
        ]
        self_count[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    if not total:
        return []
    out = [
        {
            "function": f,
            "self_percent": round(100 * c / total, 1),
            "inclusive_percent": round(100 * incl[f] / total, 1),
        }
        for f, c in self_count.most_common(n)
    ]
    return out


def _fmt(v: Any) -> str:
    return "—" if v is None else str(v)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    d = r["details"]
    lines = [
        "# vmpool benchmark",
        "",
        f"Mode: **{r['mode']}**; total wall time {_fmt(d.get('total_seconds'))} s. "
        "Generated by `python -m tests.bench` (see docs/performance.md).",
        "",
        "## Machine",
        "",
        f"- {m['cores']} logical cores ({_fmt(m.get('physical_cores'))} physical), "
        f"{m['cpu_model']}",
        f"- {m['memory_gb']} GiB memory; {m['os']}",
        f"- Python {m['python']}; PostgreSQL {m['postgresql']} (pgserver, same machine)",
        f"- load average at start: {m['load_average_at_start']}",
        "- server, PostgreSQL and the load generator share these cores (127.0.0.1)",
        "",
        "## Targets",
        "",
        "```",
        *verdicts(r),
        "```",
        "",
        "## Headline numbers",
        "",
        "Throughput and p99 figures are at **concurrency 64** (64 workers, 8 HTTP/2 "
        "connections). `lease_calls_per_s` counts Lease and Return calls together "
        "(workers loop Lease -> Return).",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| `{k}` | {_fmt(r[k])} |" for k in HEADLINE),
        "",
        "## Per concurrency",
        "",
        "| phase | c | calls/s | p50 ms | p99 ms | errors | server CPU % | server CPU ms/call "
        "| DB xacts/call | PostgreSQL CPU % | client CPU % | other processes CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, c: Any, p: dict[str, Any], kind: str, errors: int) -> str:
        return (
            f"| {name} | {c} | {_fmt(_get(p, kind, 'calls_per_s'))} | "
            f"{_fmt(_get(p, kind, 'p50_ms'))} | {_fmt(_get(p, kind, 'p99_ms'))} | {errors} | "
            f"{p.get('server_cpu_percent_each') or p['server_cpu_percent']} | "
            f"{_fmt(p.get('server_cpu_ms_per_call'))} | "
            f"{_fmt(p.get('db_transactions_per_call'))} | {p['postgres_cpu_percent']} | "
            f"{p['client_cpu_percent']} | {_fmt(p.get('other_processes_cpu_percent'))} |"
        )

    for c, p in (d.get("ping") or {}).items():
        lines.append(row("Ping", c, p, "ping", sum(p["errors"].values())))
    runs = [("{} (of Lease->Return)", c, p) for c, p in (d.get("lease") or {}).items()]
    if d.get("two_process"):
        runs.append(("{} (of Lease->Return), 2 server processes", 64, d["two_process"]))
    for label, c, p in runs:
        for kind in ("lease", "return"):
            errors = sum(v for k, v in p["errors"].items() if k.startswith(kind))
            lines.append(row(label.format(kind.capitalize()), c, p, kind, errors))
    lines += ["", *floor_report.markdown(d), "## Scenarios", ""]
    sc = d.get("scale") or {}
    for label in ("small", "big"):
        if label in sc:
            x = sc[label]
            lines.append(
                f"- scale {label}: Lease p50 {_fmt(_get(x, 'lease', 'p50_ms'))} ms, p99 "
                f"{_fmt(_get(x, 'lease', 'p99_ms'))} ms (concurrency 1, "
                f"{_fmt(_get(x, 'lease', 'calls'))} calls); instances "
                f"{x['instances_by_state']}, {x['reservations']} queued reservations"
            )
    h = d.get("handoff")
    if h:
        lines.append(
            f"- hand-off ({h['samples']} waiting Leases, one at a time): ready_at -> reply "
            f"p50 {h['ready_to_return']['p50_ms']} ms, p99 {h['ready_to_return']['p99_ms']} "
            f"ms; whole waiting Lease call (enqueue, provision, boot 0 s, set aside, serve) "
            f"p50 {h['lease_call']['p50_ms']} ms, p99 {h['lease_call']['p99_ms']} ms"
        )
    f = d.get("refill")
    if f:
        lines.append(
            f"- refill: 1,000 ready {f['seconds_from_spawn']} s after `vmpool serve` was "
            f"spawned ({f['seconds_to_listen']} s to listen, then "
            f"{f['seconds_from_listen']} s)"
        )
    i = d.get("idle")
    if i:
        lines.append(
            f"- idle ({i['window_s']} s window, 10,000 ready instances in 100 pools): server "
            f"CPU {i['server_cpu_percent']}% of one core, {i['transactions']} transactions "
            f"({i['transactions_per_s']}/s), {i['server_connections']} server connections"
        )
    prof = d.get("profile")
    if prof and prof.get("top"):
        lines += [
            "",
            "## Profile (py-spy, server under Lease->Return at concurrency 64)",
            "",
            "| function | self % | inclusive % |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{t['function']}` | {t['self_percent']} | {t['inclusive_percent']} |"
            for t in prof["top"]
        ]
    if r["failures"]:
        lines += ["", "## Not measured", "", *(f"- {x}" for x in r["failures"])]
    lines += ["", f"Scenario wall times (s): {d.get('scenario_seconds')}", ""]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    d = r["details"]
    fig, grid = plt.subplots(2, 2, figsize=(14, 9))
    axes = [grid[0][0], grid[0][1], grid[1][1]]
    floor_report.chart(grid[1][0], d)
    conc = ["1", "16", "64"]

    ax = axes[0]
    ping = [_get(d, "ping", c, "calls_per_s") or 0 for c in conc]
    lease = [_get(d, "lease", c, "calls_per_s") or 0 for c in conc]
    x = range(len(conc))
    ax.bar([i - 0.2 for i in x], ping, 0.4, label="Ping")
    ax.bar([i + 0.2 for i in x], lease, 0.4, label="Lease+Return")
    if d.get("two_process"):
        ax.bar([2.6], [d["two_process"]["calls_per_s"]], 0.3, label="Lease+Return, 2 procs")
    ax.set_xticks(list(x), [f"c={c}" for c in conc])
    ax.set_ylabel("calls/s")
    ax.set_title("Throughput")
    ax.legend(fontsize=8)

    ax = axes[1]
    for name, path_ in (
        ("Ping", ("ping", "ping")),
        ("Lease", ("lease", "lease")),
        ("Return", ("lease", "return")),
    ):
        for q, style in (("p50_ms", "-o"), ("p99_ms", "--o")):
            ys = [_get(d, path_[0], c, path_[1], q) for c in conc]
            if any(y is not None for y in ys):
                ax.plot(
                    [int(c) for c in conc],
                    [y or float("nan") for y in ys],
                    style,
                    label=f"{name} {q[:3]}",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("ms")
    ax.set_title("Latency per call")
    ax.legend(fontsize=7)

    ax = axes[2]
    names, values, colors = [], [], []
    for name, _, check in TARGETS:
        key = name.split()[0]
        v = r.get(key)
        limit = float(name.split()[-1])
        v = None if v is None else (limit / v if ">=" in name else v / limit)
        names.append(key)
        values.append(v or 0)
        ok = check(r)
        colors.append("tab:green" if ok else ("tab:red" if ok is not None else "tab:gray"))
    ax.barh(names, values, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("share of target (<= 1 passes)")
    ax.set_title("Targets")
    ax.tick_params(axis="y", labelsize=8)

    m = r["machine"]
    fig.suptitle(
        f"vmpool bench ({r['mode']}): {m['cores']} cores {m['cpu_model']}, "
        f"Python {m['python']}, PostgreSQL {m['postgresql']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# docs/performance.md carries the results table between these markers; write()
# regenerates it, and tests/unit/test_performance_doc.py checks it agrees with
# bench-results/latest.json.
DOC_BEGIN = "<!-- bench-results:begin (generated by tests/bench/report.py from bench-results/latest.json) -->"
DOC_END = "<!-- bench-results:end -->"
TIMES = "\u00d7"  # the multiplication sign the doc uses
PERFORMANCE_DOC = Path(__file__).resolve().parents[2] / "docs" / "performance.md"


def _n(v: Any, digits: int) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def _verdict(r: dict[str, Any], target: str) -> str:
    ok = r.get("targets", {}).get(target)
    return "" if ok is None else (" PASS" if ok else " **FAIL**")


def doc_table(r: dict[str, Any]) -> str:
    """The results section of docs/performance.md for one bench result."""
    m = r.get("machine", {})
    ratio = _ratio(r.get("lease_p99_ms"), r.get("ping_p99_ms"), 2)
    floor_rows = [
        (
            f"`{key}`",
            _n(r.get(key), 2) + _verdict(r, f"{key} {op} {limit}"),
            f"{'≥' if op == '>=' else '≤'} {limit}",
        )
        for key, op, limit, _ in floor_report.LIMITS
    ]
    rows = [
        *floor_rows,
        ("`floor_lease_rps_ratio` (median)", _n(r.get("floor_lease_rps_ratio"), 2), "—"),
        ("`ping_rps` (c=64)", _n(r.get("ping_rps"), 0), "—"),
        ("`lease_calls_per_s` (c=64)", _n(r.get("lease_calls_per_s"), 0), "—"),
        ("`lease_to_ping_ratio`", _n(r.get("lease_to_ping_ratio"), 2), "—"),
        (
            "`ping_p99_ms` / `lease_p99_ms` (c=64)",
            f"{_n(r.get('ping_p99_ms'), 0)} / {_n(r.get('lease_p99_ms'), 0)}"
            f" ({_n(ratio, 2)} {TIMES})",
            "—",
        ),
        (
            "`scale_p50_ratio`",
            _n(r.get("scale_p50_ratio"), 2) + _verdict(r, "scale_p50_ratio <= 1.2"),
            "≤ 1.2",
        ),
        (
            "`handoff_p99_ms`",
            _n(r.get("handoff_p99_ms"), 0) + _verdict(r, "handoff_p99_ms <= 50"),
            "≤ 50",
        ),
        (
            "`refill_1000_s`",
            _n(r.get("refill_1000_s"), 2) + _verdict(r, "refill_1000_s <= 10"),
            "≤ 10",
        ),
        (
            "`idle_cpu_percent`",
            _n(r.get("idle_cpu_percent"), 1) + _verdict(r, "idle_cpu_percent <= 2"),
            "≤ 2",
        ),
        (
            "`idle_db_statements_per_s`",
            _n(r.get("idle_db_statements_per_s"), 1) + _verdict(r, "idle_db_statements_per_s <= 5"),
            "≤ 5",
        ),
        ("`two_process_speedup`", _n(r.get("two_process_speedup"), 2), "—"),
    ]
    lines = [
        f"Run: `{r.get('mode', '?')}` mode on {m.get('cores', '?')} vCPUs "
        f'"{m.get("cpu_model", "?")}", {m.get("memory_gb", "?")} GiB, {m.get("os", "?")}, '
        f"Python {m.get('python', '?')}, PostgreSQL {m.get('postgresql', '?')}. "
        f"Floor ratios (vmpool / floor, same run) from the {r.get('floor_generator')} "
        "generator, median of the rounds.",
        "",
        "| key | committed run | target |",
        "|---|---|---|",
        *(f"| {k} | {v} | {t} |" for k, v, t in rows),
    ]
    return "\n".join(lines)


def with_doc_table(doc: str, r: dict[str, Any]) -> str:
    """``doc`` with the block between the markers replaced by ``doc_table(r)``."""
    start = doc.index(DOC_BEGIN) + len(DOC_BEGIN)
    end = doc.index(DOC_END)
    return doc[:start] + "\n" + doc_table(r) + "\n" + doc[end:]


def doc_block(doc: str) -> str:
    return doc[doc.index(DOC_BEGIN) + len(DOC_BEGIN) : doc.index(DOC_END)].strip("\n")


def write(result: dict[str, Any], out: Path, doc: Path | None = PERFORMANCE_DOC) -> None:
    (out / "latest.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    (out / "latest.md").write_text(markdown(result))
    chart(result, out / "latest.png")
    if doc is not None:
        update_doc(result, doc)


def update_doc(result: dict[str, Any], doc: Path = PERFORMANCE_DOC) -> None:
    """Regenerate the results table of ``doc`` (if it has the markers)."""
    if doc.exists() and DOC_BEGIN in doc.read_text():
        doc.write_text(with_doc_table(doc.read_text(), result))
