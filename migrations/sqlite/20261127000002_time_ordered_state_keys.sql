-- State keys are now 16 hex digits of creation time followed by the state's SHA-256.
-- SQLite's TEXT has no length, so only the other backends change; this keeps the
-- migration history the same on all three.
SELECT 1;
