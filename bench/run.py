"""Run every benchmark in sequence and print one summary table.

    python -m bench.run            # default sizes (a few minutes on 2 cores)
    python -m bench.run --quick    # small sizes, a smoke test (< 2 min)

The ingest benchmark includes a profiled run (py-spy if found, else cProfile) unless
``--no-profile``. Each benchmark also writes its own JSON to bench/out/; the summary
goes to bench/out/summary-*.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import ingest, series_pg
from bench.common import figures_table, machine_info, write_result

__all__ = ["main"]

QUICK = {"instances": 300, "series": 4, "pg_series": 10, "pg_per_series": 20, "sink_rows": 2000}
DEFAULT = {"instances": 2000, "series": 20, "pg_series": 50, "pg_per_series": 100, "sink_rows": 20_000}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled ingest run")
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile"], default="auto")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    started = time.monotonic()

    ing = ingest.run_ingest(instances=sizes["instances"], series=sizes["series"], profile=not args.no_profile,
                            profiler=args.profiler)
    print(ingest.report(ing), end="\n\n", flush=True)
    ser = series_pg.run_series_pg(series=sizes["pg_series"], per_series=sizes["pg_per_series"],
                                  sink_rows=sizes["sink_rows"])
    print(series_pg.report(ser), end="\n\n", flush=True)

    figures = ing.figures + ser.figures
    elapsed = time.monotonic() - started
    info = machine_info()
    print(f"summary ({'quick' if args.quick else 'default'} sizes, {elapsed:.0f} s; {info['cpu_model']}, "
          f"{info['cores']} cores, Python {info['python']})")
    print(figures_table(figures))
    if ing.profile is not None:
        top = ", ".join(f"{lib} {share:.0%}" for lib, share in ing.profile.by_library[:6])
        print(f"ingest worker time ({ing.profile.tool}): {top}")
    payload: dict[str, Any] = {"quick": args.quick, "sizes": sizes, "elapsed_s": elapsed,
                               "figures": [f.as_dict() for f in figures],
                               "results": {"ingest": str(ing.path), "series_pg": str(ser.path)},
                               "profile_by_library": ing.profile.by_library if ing.profile else None}
    print(f"results: {write_result('summary', payload)}")


if __name__ == "__main__":
    main()
