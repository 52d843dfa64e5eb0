-- The gateway's pace per amoCRM account: the next moment (microseconds since the Unix epoch,
-- on the database's clock) a request to the account may be sent. Every replica reserves its
-- slot here, so together they send at most the configured rate.
CREATE TABLE amoauth_gateway_pace (
    account_id    BIGINT PRIMARY KEY,
    next_free_us  BIGINT NOT NULL
);
