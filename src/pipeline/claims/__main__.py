"""``python -m pipeline.claims [results/claims.parquet]``: print the claims table, then ``N of M
claims hold`` and each claim that does not (the last lines of ``make default``). Exits 0 whether
or not the claims hold; 1 only when the table cannot be read."""

from __future__ import annotations

import sys

from pipeline import io
from pipeline.claims.report import summary_lines


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "results/claims.parquet"
    try:
        table = io.read_parquet(path)
    except io.ArtifactError as err:
        print(f"claims: {err} (run `snakemake results/claims.parquet` first)", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
