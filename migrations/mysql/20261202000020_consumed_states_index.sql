-- SQLite and PostgreSQL index only the audit rows of consumed states by fingerprint; MySQL
-- and MariaDB have no partial indexes, so theirs stays whole. Kept so all three histories
-- match.
SELECT 1;
