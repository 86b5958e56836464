"""Runs the repo's Athena SQL, unchanged, in DuckDB over a local copy of the archive.

The local copy has the bucket's layout: ROOT/readings/dt=YYYY-MM-DD/host=HOST/
segment-NNNNNNNNNN-STOREID.jsonl.gz. The view `readings` has the Glue table's columns and
types (partition columns as strings, as Athena's projection gives them), so the same
SQL text runs on both engines.

    python3 infra/athena/archive_sql.py ROOT [readings_duplicates.sql ...]
"""

import sys
from pathlib import Path

import duckdb

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


def main():
    root = sys.argv[1]
    con = connect(root)
    for name in sys.argv[2:] or ["readings_duplicates.sql"]:
        names, rows = query(con, name)
        print("\t".join(names))
        for row in rows:
            print("\t".join(str(v) for v in row))


if __name__ == "__main__":
    main()
