-- SQLite's states table becomes one b-tree keyed by the state (WITHOUT ROWID); PostgreSQL's
-- heap and InnoDB's clustered primary key need no change. Kept so all three histories match.
SELECT 1;
