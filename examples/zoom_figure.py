"""Real and synthetic slides side by side at three zooms (the README's figure).

    python examples/zoom_figure.py OUT.png SYNTHETIC.ome.tif REAL [REAL ...] \
        [--source-mpp PATTERN=µm/px ...] [--fields 2048,512,128] [--panel 320]

Rows: the synthetic slide first, then each real slide; columns: fields of view in µm, nested
around the point where the widest field holds the most tissue (nca_tiles/evaluation/zoom_figure.py).
"""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

from nca_tiles.evaluation.zoom_figure import FigureRow, write_zoom_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("synthetic")
    parser.add_argument("real", nargs="+")
    parser.add_argument("--source-mpp", action="append", default=[], metavar="PATTERN=UM",
                        help="µm/px of real slides whose metadata has none, by file-name pattern")
    parser.add_argument("--fields", default="2048,512,128", help="fields of view in µm, comma-separated")
    parser.add_argument("--panel", type=int, default=320, help="panel side in px")
    args = parser.parse_args()
    patterns = [(p, float(v)) for p, v in (item.split("=", 1) for item in args.source_mpp)]

    def mpp_of(path: str) -> float | None:
        return next((v for p, v in patterns if fnmatch.fnmatch(Path(path).name, p)), None)

    rows = [FigureRow(args.synthetic, "synthetic (nca-tiles)")]
    rows += [FigureRow(path, f"real: {Path(path).name}", mpp_of(path)) for path in args.real]
    write_zoom_figure(rows, args.out, tuple(float(f) for f in args.fields.split(",")), args.panel)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
