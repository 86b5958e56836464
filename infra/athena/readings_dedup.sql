-- Every stored reading once: one row per (sensor, seq), the copy received first.
--
-- Raw duplicates exist in the archive when a server stored a reading but died before
-- acknowledging it, and the sensor resent it to another server behind the balancer.
-- Both copies carry the same sensor, seq, kind and value; the earliest `recv` wins
-- (then the day, so the choice is deterministic; copies that tie on both differ
-- only in the server that stored them).
--
-- Runs unchanged on Athena (Trino) and DuckDB. `readings` is the Glue table over
-- PREFIX/readings/ on Athena (infra/sensorhub.yaml), and on DuckDB the view that
-- infra/athena/archive_sql.py creates over a downloaded copy of the same objects.
SELECT sensor, kind, "value", seq, ts, recv, dt
FROM (
  SELECT sensor, kind, "value", seq, ts, recv, dt,
         row_number() OVER (PARTITION BY sensor, seq ORDER BY recv, dt) AS copy_rank
  FROM readings
) AS ranked
WHERE copy_rank = 1
