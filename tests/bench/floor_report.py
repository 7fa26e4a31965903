"""The vmpool-against-the-floor part of the bench's outputs (tests/bench/versus.py):
headline ratios, their targets, the markdown section and the chart panel."""

from __future__ import annotations

from typing import Any

# headline key -> (ratio in versus.RATIOS, statistic over the rounds)
KEYS = {
    "floor_ping_cpu_ratio": ("ping_server_cpu", "median"),
    "floor_lease_cpu_ratio": ("lease_server_cpu", "median"),
    "floor_lease_machine_cpu_ratio": ("lease_machine_cpu", "median"),
    "floor_lease_rps_ratio": ("lease_rps", "median"),
    "floor_lease_rps_ratio_min": ("lease_rps", "min"),
    "floor_cycle_p99_ratio": ("cycle_p99", "median"),
    "floor_c1_cycle_p50_ratio": ("c1_cycle_p50", "median"),
    "floor_c1_lease_cpu_ratio": ("c1_lease_server_cpu", "median"),
}

# (headline key, op, limit, description): issue 23's targets, all ratios to the floor.
LIMITS = [
    ("floor_ping_cpu_ratio", "<=", 1.25, "server CPU per Ping vs the floor's, c=64"),
    (
        "floor_lease_cpu_ratio",
        "<=",
        1.25,
        "server CPU (process tree) per Lease or Return RPC vs the floor's, c=64",
    ),
    (
        "floor_lease_machine_cpu_ratio",
        "<=",
        1.3,
        "whole machine's CPU per Lease or Return RPC vs the floor's, c=64",
    ),
    (
        "floor_lease_rps_ratio_min",
        ">=",
        0.8,
        "Lease+Return RPC/s vs the floor's, c=64, worst round",
    ),
    ("floor_cycle_p99_ratio", "<=", 1.3, "Lease+Return cycle p99 vs the floor's, c=64"),
    ("floor_c1_cycle_p50_ratio", "<=", 1.3, "Lease+Return cycle p50 vs the floor's, c=1"),
    (
        "floor_c1_lease_cpu_ratio",
        "<=",
        1.5,
        "server CPU per Lease or Return RPC vs the floor's, c=1",
    ),
    (
        "auth_cpu_ratio",
        "<=",
        1.1,
        "server CPU per Lease or Return RPC with TLS + kubernetes auth vs without (--auth)",
    ),
]


def headline(details: dict[str, Any]) -> dict[str, Any]:
    """The floor ratios of the primary generator (grpc-go when Go is installed)."""
    v = details.get("versus") or {}
    ratios = (v.get(v.get("primary", ""), {}) or {}).get("ratios", {})
    out: dict[str, Any] = {"floor_generator": v.get("primary")}
    for key, (name, stat) in KEYS.items():
        out[key] = (ratios.get(name) or {}).get(stat)
    auth = details.get("auth") or {}
    out["auth_cpu_ratio"] = auth.get("cpu_ratio")  # only with --auth
    out["auth_cache_hit_rate"] = auth.get("cache_hit_rate_at_least")
    return out


def _fmt(v: Any) -> str:
    return "—" if v is None else str(v)


def markdown(details: dict[str, Any]) -> list[str]:
    lines = _auth_lines(details.get("auth"))
    v = details.get("versus")
    if not v:
        return lines
    lines += [
        "## vmpool against the floor",
        "",
        "The floor (tests/bench/floor.py: grpclib + protobuf/upb, one statement per "
        "Lease or Return, asyncpg pool of 8, its own PostgreSQL) and `vmpool serve` "
        f"({v['vmpool_config']['pools'][0]}, reconcile_interval "
        f"{v['vmpool_config']['reconcile_interval']}) measured interleaved, "
        f"{len(v[v['primary']]['rounds'])} rounds; each ratio is vmpool / floor within "
        "a round (ratios in one run are what count on this shared machine).",
        "",
        "| ratio | generator | median | rounds |",
        "|---|---|---|---|",
    ]
    for gen in v["generators"]:
        for name, r in v[gen]["ratios"].items():
            lines.append(f"| {name} | {gen} | {_fmt(r['median'])} | {r['rounds']} |")
    if v.get("baseline"):
        lines += [
            "",
            f"Before/after: `before` is `vmpool serve` from {v['baseline']}, in the same rounds.",
            "",
            "| ratio | generator | after / before (median) | rounds | before / floor (median) |",
            "|---|---|---|---|---|",
        ]
        for gen in v["generators"]:
            for name, r in v[gen]["ratios_after_to_before"].items():
                b = v[gen]["ratios_before"][name]["median"]
                lines.append(
                    f"| {name} | {gen} | {_fmt(r['median'])} | {r['rounds']} | {_fmt(b)} |"
                )
    lines += [
        "",
        "| generator | round | side | phase | calls/s | server ms/call | machine ms/call "
        "| cycle p50 ms | cycle p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for gen in v["generators"]:
        for i, rnd in enumerate(v[gen]["rounds"], 1):
            for side in (k for k in rnd if k != "order"):
                for phase, p in rnd[side].items():
                    cyc = p.get("cycle") or {}
                    lines.append(
                        f"| {gen} | {i} | {side} | {phase} | {p['calls_per_s']} | "
                        f"{_fmt(p.get('server_cpu_ms_per_call'))} | "
                        f"{_fmt(p.get('machine_cpu_ms_per_call'))} | "
                        f"{_fmt(cyc.get('p50_ms'))} | {_fmt(cyc.get('p99_ms'))} | "
                        f"{sum(p['errors'].values())} |"
                    )
    lines.append("")
    return lines


def _auth_lines(a: dict[str, Any] | None) -> list[str]:
    if not a or "cpu_ratio" not in a:
        return []
    return [
        "## TLS + kubernetes auth (--auth)",
        "",
        f"Generator: {a['generator']}; Lease->Return at c=64, interleaved rounds. Server CPU "
        f"per Lease or Return RPC with / without: {a['cpu_ratio']} (rounds "
        f"{a['cpu_ratio_rounds']}). TokenReviews: {a['token_reviews']} for at least "
        f"{a['authenticated_calls_at_least']} calls (cache hit rate >= "
        f"{a['cache_hit_rate_at_least']}); cache TTL {a['cache_ttl']}: a revoked token keeps "
        "working at most that long.",
        "",
    ]


def chart(ax: Any, details: dict[str, Any]) -> None:
    """Median vmpool/floor ratio per generator, with each round's value as a dot."""
    v = details.get("versus")
    ax.set_title("vmpool / floor (same run)")
    if not v:
        return
    names = list(next(iter(v[g]["ratios"] for g in v["generators"])).keys())
    width = 0.8 / len(v["generators"])
    for j, gen in enumerate(v["generators"]):
        ys = [v[gen]["ratios"][n]["median"] or 0 for n in names]
        xs = [i + j * width for i in range(len(names))]
        ax.barh(xs, ys, width, label=gen)
        for x, n in zip(xs, names, strict=True):
            pts = [p for p in v[gen]["ratios"][n]["rounds"] if p is not None]
            ax.plot(pts, [x] * len(pts), "k.", ms=3)
    ax.set_yticks([i + width / 2 for i in range(len(names))], names, fontsize=7)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("ratio (1 = the floor)")
    ax.legend(fontsize=7)
