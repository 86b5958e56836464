-- Per sensor: raw records in the archive, distinct readings, and the raw duplicates
-- that readings_dedup.sql removes. Runs unchanged on Athena (Trino) and DuckDB.
SELECT sensor,
       count(*) AS raw_records,
       count(DISTINCT seq) AS readings,
       count(*) - count(DISTINCT seq) AS raw_duplicates
FROM readings
GROUP BY sensor
ORDER BY sensor
