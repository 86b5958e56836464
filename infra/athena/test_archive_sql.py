"""The archive SQL as it is in the repo, run by DuckDB over a small archive written
here in the bucket's layout. Run by .ci/run: `pytest infra/athena`."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archive_sql  # noqa: E402


def segment(root, day, host, number, records):
    path = root / "readings" / f"dt={day}" / f"host={host}" / f"segment-{number:010}-0123456789abcdef.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))


def reading(sensor, seq, recv, value=20.5, ts=None):
    r = {"sensor": sensor, "kind": "temperature", "value": value, "seq": seq}
    if ts is not None:
        r["ts"] = ts
    r["recv"] = recv
    return r


def test_each_reading_once_keeping_the_earliest_copy(tmp_path):
    # Server a stored seq 2 and died before acking; the sensor resent it to b, which
    # stored it later. A third copy on a later day (a restored old volume) too.
    segment(tmp_path, "2026-11-30", "a", 1, [reading("s1", 1, 100, ts=7), reading("s1", 2, 101)])
    segment(tmp_path, "2026-11-30", "b", 4, [reading("s1", 2, 150), reading("s1", 3, 151)])
    segment(tmp_path, "2026-12-01", "c", 1, [reading("s1", 2, 99_999_999)])
    segment(tmp_path, "2026-11-30", "b", 5, [reading("s2", 9, 160, value=-3)])
    con = archive_sql.connect(tmp_path)

    names, rows = archive_sql.query(con, "readings_dedup.sql")
    assert names == ["sensor", "kind", "value", "seq", "ts", "recv", "dt"]
    by_key = {(r[0], r[3]): r for r in rows}
    assert len(rows) == len(by_key) == 4
    assert by_key[("s1", 2)][5:] == (101, "2026-11-30"), "the earliest recv wins"
    assert by_key[("s1", 1)][4] == 7 and by_key[("s1", 3)][4] is None
    assert by_key[("s2", 9)][2] == -3.0

    names, rows = archive_sql.query(con, "readings_duplicates.sql")
    assert names == ["sensor", "raw_records", "readings", "raw_duplicates"]
    assert rows == [("s1", 5, 3, 2), ("s2", 1, 1, 0)]


def test_the_athena_named_query_is_this_file():
    template = (archive_sql.HERE.parent / "sensorhub.yaml").read_text()
    start = template.index("      QueryString: |\n") + len("      QueryString: |\n")
    end = template.index("\n\n", start)
    inline = "".join(line[8:] + "\n" for line in template[start:end].split("\n"))
    assert inline == (archive_sql.HERE / "readings_dedup.sql").read_text()


SCRIPT = Path(__file__).resolve().parent / "archive_sql.py"


def run_script(*args, env=None):
    import os
    import subprocess
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_help_and_bad_arguments_answer_without_a_traceback(tmp_path):
    helped = run_script("--help")
    assert helped.returncode == 0 and "ROOT" in helped.stdout, helped
    no_root = run_script(str(tmp_path / "nowhere"))
    assert no_root.returncode == 2 and "holds no readings/ directory" in no_root.stderr, no_root
    segment(tmp_path, "2026-11-30", "a", 1, [reading("s1", 1, 100)])
    no_sql = run_script(str(tmp_path), "nosuch.sql")
    assert no_sql.returncode == 2 and "no nosuch.sql" in no_sql.stderr, no_sql
    for run in (helped, no_root, no_sql):
        assert "Traceback" not in run.stderr, run.stderr


def test_without_duckdb_the_script_says_how_to_get_it(tmp_path):
    (tmp_path / "duckdb.py").write_text("raise ImportError('no duckdb here')\n")
    run = run_script(str(tmp_path), env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 1, run
    assert "needs DuckDB (pip install duckdb)" in run.stderr and "Traceback" not in run.stderr, run.stderr
