-- Issue 15's one-round-trip install and state consumption are MySQL/MariaDB procedures
-- (migrations/mysql); here they are single statements or inline transactions: nothing to change.
SELECT 1;
