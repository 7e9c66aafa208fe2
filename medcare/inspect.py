"""What did the mixture of experts do? Print a stage-1 directory's expert-usage summary and redraw its heatmap.

    python -m medcare.inspect STAGE_DIR                 # summary + STAGE_DIR/expert_usage.png
    python -m medcare.inspect STAGE_DIR --plot out.png  # the heatmap elsewhere (e.g. a read-only STAGE_DIR)
    python -m medcare.inspect STAGE_DIR --no-plot

Stage 1 counts, per layer and projection, how often each routed expert and each pair of experts was chosen
(training tokens, padding excluded) and writes them to STAGE_DIR/expert_usage.json; see medcare.usage.
The summary gives each layer's load balance as the coefficient of variation of its experts' loads.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import usage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medcare.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("stage_dir", help="a stage-1 output directory (holds expert_usage.json)")
    ap.add_argument("--plot", default=None, help="where to write the heatmap PNG (default STAGE_DIR/expert_usage.png)")
    ap.add_argument("--no-plot", action="store_true", help="print the summary only")
    args = ap.parse_args(argv)
    try:
        report = usage.read_report(args.stage_dir)
        try:
            print("\n".join(usage.summary_lines(report)))
            if not args.no_plot:
                _plot(report, args.plot or os.path.join(args.stage_dir, usage.PLOT_FILE))
        except (KeyError, TypeError, IndexError, ZeroDivisionError) as exc:
            raise ValueError(f"{os.path.join(args.stage_dir, usage.USAGE_FILE)}: damaged report "
                             f"({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        print(f"medcare.inspect: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _plot(report: dict, path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--plot {path} is a directory; give a file name ending in .png")
    try:
        written = usage.write_plot(report, path)
    except OSError as exc:
        raise ValueError(f"cannot write {path} ({exc.strerror or exc}); pass --plot FILE elsewhere") from None
    if written:
        print(f"heatmap written to {written}")

if __name__ == "__main__":
    sys.exit(main())
