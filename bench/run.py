"""Run every benchmark in sequence and print one summary table.

    python -m bench.run            # default sizes (~7 min on 2 cores)
    python -m bench.run --quick    # small sizes, a smoke test (~2.5 min; --no-profile saves ~10 s)
    python -m bench.run --full     # default sizes plus the long variants (RSS up to 50k instances)

Benchmarks: ingest throughput, series window + PostgreSQL sink, Doris rows per load, C-STORE
to PostgreSQL (rate and latency), the whole stack's cost per instance against Orthanc
(``bench.cost``), worker peak RSS. ``--only NAME,...`` runs a subset.

The ingest benchmark includes a profiled run (py-spy if found, else cProfile) unless
``--no-profile``. Each benchmark also writes its own JSON to bench/out/; the summary
goes to bench/out/summary-*.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench import cost, doris, ingest, rss, scp, series_pg
from bench.common import Figure, figures_table, machine_info, write_result

__all__ = ["main"]

BENCHMARKS = ("ingest", "series_pg", "doris", "scp", "cost", "rss")
QUICK: dict[str, Any] = {"instances": 300, "series": 4, "pg_series": 10, "pg_per_series": 20, "sink_rows": 2000,
                         "doris_instances": 1000, "scp_instances": 500, "latency_instances": 100,
                         "latency_per_series": 50, "rss_sizes": [1000, 5000], "cost_instances": 500}
DEFAULT: dict[str, Any] = {"instances": 2000, "series": 20, "pg_series": 50, "pg_per_series": 100,
                           "sink_rows": 20_000, "doris_instances": 5000, "scp_instances": 5000,
                           "latency_instances": 500, "latency_per_series": 100, "rss_sizes": [5000, 20_000],
                           "cost_instances": 5000}
FULL: dict[str, Any] = {**DEFAULT, "rss_sizes": [5000, 20_000, 50_000]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    size.add_argument("--full", action="store_true", help="default sizes plus the long variants (minutes more)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled ingest run")
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile"], default="auto")
    parser.add_argument("--sender", choices=["auto", "storescu", "pynetdicom"], default="auto",
                        help="C-STORE sender of the scp benchmark")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    sizes = QUICK if args.quick else FULL if args.full else DEFAULT
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()

    figures: list[Figure] = []
    results: dict[str, str] = {}
    seconds: dict[str, float] = {}
    profile_line = ""
    by_library: Any = None

    def step(name: str, run: Callable[[], Any], report: Callable[[Any], str]) -> Any:
        t = time.monotonic()
        result = run()
        seconds[name] = time.monotonic() - t
        print(report(result), end="\n\n", flush=True)
        figures.extend(result.figures)
        results[name] = str(result.path)
        return result

    if "ingest" in chosen:
        ing = step("ingest", lambda: ingest.run_ingest(instances=sizes["instances"], series=sizes["series"],
                                                       profile=not args.no_profile, profiler=args.profiler),
                   ingest.report)
        if ing.profile is not None:
            top = ", ".join(f"{lib} {share:.0%}" for lib, share in ing.profile.by_library[:6])
            profile_line = f"ingest worker time ({ing.profile.tool}): {top}"
            by_library = ing.profile.by_library
    if "series_pg" in chosen:
        step("series_pg", lambda: series_pg.run_series_pg(series=sizes["pg_series"], per_series=sizes["pg_per_series"],
                                                          sink_rows=sizes["sink_rows"]), series_pg.report)
    if "doris" in chosen:
        step("doris", lambda: doris.run_doris(instances=sizes["doris_instances"]), doris.report)
    if "scp" in chosen:
        step("scp", lambda: scp.run_scp(instances=sizes["scp_instances"], latency_instances=sizes["latency_instances"],
                                        latency_per_series=sizes["latency_per_series"], sender=args.sender),
             scp.report)
    if "cost" in chosen:
        step("cost", lambda: cost.run_cost(instances=sizes["cost_instances"], profile=not args.no_profile),
             cost.report)
    if "rss" in chosen:
        step("rss", lambda: rss.run_rss(sizes=sizes["rss_sizes"]), rss.report)

    elapsed = time.monotonic() - started
    info = machine_info()
    print(f"summary ({mode} sizes, {elapsed:.0f} s: "
          f"{', '.join(f'{n} {s:.0f} s' for n, s in seconds.items())}; {info['cpu_model']}, "
          f"{info['cores']} cores, Python {info['python']})")
    print(figures_table(figures))
    if profile_line:
        print(profile_line)
    payload: dict[str, Any] = {"quick": args.quick, "mode": mode, "sizes": sizes, "elapsed_s": elapsed,
                               "seconds": seconds, "figures": [f.as_dict() for f in figures], "results": results,
                               "profile_by_library": by_library}
    print(f"results: {write_result('summary', payload)}")


if __name__ == "__main__":
    main()
