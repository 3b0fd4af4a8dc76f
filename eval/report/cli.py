"""`crate report` (the paper's tables and figures from results and runs) and `crate browse` (the neuron browser).

    crate report RUNS... [--out report]                                  tables (md, csv, tex) and plots
    crate browse RESULTS... [--out browser] [--serve]                    static neuron browser
"""

from __future__ import annotations

import argparse

from crate.argtypes import nonnegative_int, positive_int


def cmd_report(args: argparse.Namespace) -> int:
    from crate.eval.report.reproduction import write_report

    index = write_report(args.runs, args.out, seed=args.seed, n_boot=args.n_boot)
    print(f"report: {index}")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from crate.eval.report.browser import serve, write_browser

    index = write_browser(args.results, args.out, top=args.top, random=args.random)
    print(f"neuron browser: {index.resolve()}  (open it in a browser; no server needed)")
    if args.serve:
        serve(index.parent, args.port)
    return 0


def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUNS", help="folders holding `crate interpret` results and/or `crate train` runs (searched recursively)")
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="bootstrap seed")
    p.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap resamples")
    p.set_defaults(func=cmd_report)


def add_browse(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS", help="`crate interpret` output folders (searched recursively)")
    p.add_argument("--out", default="browser", help="output folder (default: browser)")
    p.add_argument("--top", type=nonnegative_int, default=20, help="top-activating records shown per neuron")
    p.add_argument("--random", type=nonnegative_int, default=10, help="random records shown per neuron")
    p.add_argument("--serve", action="store_true", help="also serve it on http://127.0.0.1:PORT/")
    p.add_argument("--port", type=positive_int, default=8000)
    p.set_defaults(func=cmd_browse)
