"""Runs the repo's Athena SQL, unchanged, in DuckDB over a local copy of the archive.

The local copy has the bucket's layout: ROOT/readings/dt=YYYY-MM-DD/host=HOST/
segment-NNNNNNNNNN-STOREID.jsonl.gz. The view `readings` has the Glue table's columns and
types (partition columns as strings, as Athena's projection gives them), so the same
SQL text runs on both engines.

    python3 infra/athena/archive_sql.py ROOT [readings_duplicates.sql ...]
"""

import argparse
import sys
from pathlib import Path

try:
    import duckdb
except ImportError:
    if __name__ != "__main__":
        raise  # a caller that can do without it decides (nixos-tests/netns.py)
    sys.exit("archive_sql.py: needs DuckDB (pip install duckdb); scripts/test.sh installs it "
             "into ~/.cache/sensorhub-test-venv, so ~/.cache/sensorhub-test-venv/bin/python3 "
             "infra/athena/archive_sql.py ... runs it")

HERE = Path(__file__).resolve().parent
COLUMNS = {"sensor": "VARCHAR", "kind": "VARCHAR", "value": "DOUBLE",
           "seq": "BIGINT", "ts": "BIGINT", "recv": "BIGINT"}


def connect(root):
    """A DuckDB connection whose `readings` view covers the archive copy at `root`."""
    con = duckdb.connect()
    pattern = str(Path(root) / "readings" / "*" / "*" / "*.jsonl.gz").replace("'", "''")
    columns = ", ".join(f"'{name}': '{kind}'" for name, kind in COLUMNS.items())
    con.execute(
        f"CREATE VIEW readings AS SELECT * FROM read_json('{pattern}', "
        f"format = 'newline_delimited', hive_partitioning = true, "
        f"hive_types = {{'dt': 'VARCHAR', 'host': 'VARCHAR'}}, columns = {{{columns}}})")
    return con


def query(con, name):
    """Runs infra/athena/NAME as written; returns column names and rows."""
    result = con.execute((HERE / name).read_text())
    return [d[0] for d in result.description], result.fetchall()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="archive_sql.py",
        description="Run the repo's Athena SQL (infra/athena/*.sql) in DuckDB over a local "
                    "copy of the archive (aws s3 sync s3://BUCKET/PREFIX ROOT).")
    parser.add_argument("root", metavar="ROOT", type=Path,
                        help="the copy: ROOT/readings/dt=YYYY-MM-DD/host=HOST/*.jsonl.gz")
    parser.add_argument("sql", metavar="SQL", nargs="*", default=["readings_duplicates.sql"],
                        help="files in infra/athena to run (default: readings_duplicates.sql)")
    args = parser.parse_args(argv)
    if not (args.root / "readings").is_dir():
        parser.exit(2, f"archive_sql.py: {args.root} holds no readings/ directory: give the "
                       f"directory the archive's prefix was copied into\n")
    for name in args.sql:
        if not (HERE / name).is_file():
            known = ", ".join(sorted(p.name for p in HERE.glob("*.sql")))
            parser.exit(2, f"archive_sql.py: no {name} in {HERE} (there are: {known})\n")
    try:
        con = connect(args.root)
        for name in args.sql:
            names, rows = query(con, name)
            print("\t".join(names))
            for row in rows:
                print("\t".join(str(v) for v in row))
    except duckdb.Error as e:
        parser.exit(1, f"archive_sql.py: DuckDB: {e}\n")


if __name__ == "__main__":
    main()
