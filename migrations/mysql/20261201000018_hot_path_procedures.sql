-- Issue 15: an install and a callback's state consumption each take one round trip, a CALL.
-- The SQL inside is the store's (store/states.rs): the same columns, the same conditional
-- DELETE deciding which callback consumes a state. State keys are ascii_bin, as the column.

CREATE PROCEDURE amoauth_start_install(
    IN p_state_hash VARCHAR(80) CHARACTER SET ascii COLLATE ascii_bin,
    IN p_subdomain VARCHAR(255),
    IN p_created_at DATETIME(6),
    IN p_expires_at DATETIME(6),
    IN p_ip VARCHAR(64),
    IN p_user_agent TEXT,
    IN p_external_id VARCHAR(255),
    IN p_return_url TEXT,
    IN p_mode VARCHAR(16),
    IN p_platform VARCHAR(16),
    IN a_kind VARCHAR(32),
    IN a_outcome VARCHAR(32),
    IN a_reason VARCHAR(64),
    IN a_detail TEXT,
    IN a_subdomain VARCHAR(255),
    IN a_account_id BIGINT,
    IN a_ip VARCHAR(64),
    IN a_user_agent TEXT,
    IN a_state_fingerprint VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin,
    IN a_state_consumed BOOLEAN,
    IN a_created_at DATETIME(6),
    IN a_finished_at DATETIME(6)
)
MODIFIES SQL DATA
BEGIN
    DECLARE EXIT HANDLER FOR SQLEXCEPTION
    BEGIN
        ROLLBACK;
        RESIGNAL;
    END;
    START TRANSACTION;
    INSERT INTO amocrm_oauth_states (state_hash, subdomain, created_at, expires_at, ip,
        user_agent, external_id, return_url, mode, platform)
    VALUES (p_state_hash, p_subdomain, p_created_at, p_expires_at, p_ip, p_user_agent,
        p_external_id, p_return_url, p_mode, p_platform);
    INSERT INTO amocrm_oauth_attempts (kind, outcome, reason, detail, subdomain, account_id, ip,
        user_agent, state_fingerprint, state_consumed, created_at, finished_at)
    VALUES (a_kind, a_outcome, a_reason, a_detail, a_subdomain, a_account_id, a_ip, a_user_agent,
        a_state_fingerprint, a_state_consumed, a_created_at, a_finished_at);
    COMMIT;
END;

-- Answers the consumed state and its audit row's id, or nothing when this call consumed
-- nothing (expired, used or unknown: the store then asks which).
CREATE PROCEDURE amoauth_consume_state(
    IN p_state_hash VARCHAR(80) CHARACTER SET ascii COLLATE ascii_bin,
    IN p_now DATETIME(6),
    IN a_kind VARCHAR(32),
    IN a_outcome VARCHAR(32),
    IN a_reason VARCHAR(64),
    IN a_detail TEXT,
    IN a_subdomain VARCHAR(255),
    IN a_account_id BIGINT,
    IN a_ip VARCHAR(64),
    IN a_user_agent TEXT,
    IN a_state_fingerprint VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin,
    IN a_state_consumed BOOLEAN,
    IN a_created_at DATETIME(6),
    IN a_finished_at DATETIME(6)
)
MODIFIES SQL DATA
BEGIN
    DECLARE v_subdomain VARCHAR(255);
    DECLARE v_created_at DATETIME(6);
    DECLARE v_expires_at DATETIME(6);
    DECLARE v_ip VARCHAR(64);
    DECLARE v_user_agent TEXT;
    DECLARE v_external_id VARCHAR(255);
    DECLARE v_return_url TEXT;
    DECLARE v_mode VARCHAR(16);
    DECLARE v_platform VARCHAR(16);
    DECLARE v_attempt_id BIGINT DEFAULT NULL;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION
    BEGIN
        ROLLBACK;
        RESIGNAL;
    END;
    START TRANSACTION;
    SELECT subdomain, created_at, expires_at, ip, user_agent, external_id, return_url, mode,
        platform
    INTO v_subdomain, v_created_at, v_expires_at, v_ip, v_user_agent, v_external_id,
        v_return_url, v_mode, v_platform
    FROM amocrm_oauth_states WHERE state_hash = p_state_hash AND expires_at > p_now;
    DELETE FROM amocrm_oauth_states WHERE state_hash = p_state_hash AND expires_at > p_now;
    IF ROW_COUNT() = 1 THEN
        INSERT INTO amocrm_oauth_attempts (kind, outcome, reason, detail, subdomain, account_id,
            ip, user_agent, state_fingerprint, state_consumed, created_at, finished_at)
        VALUES (a_kind, a_outcome, a_reason, a_detail, a_subdomain, a_account_id, a_ip,
            a_user_agent, a_state_fingerprint, a_state_consumed, a_created_at, a_finished_at);
        SET v_attempt_id = LAST_INSERT_ID();
    END IF;
    COMMIT;
    IF v_attempt_id IS NOT NULL THEN
        SELECT v_subdomain AS subdomain, v_created_at AS created_at, v_expires_at AS expires_at,
            v_ip AS ip, v_user_agent AS user_agent, v_external_id AS external_id,
            v_return_url AS return_url, v_mode AS mode, v_platform AS platform,
            v_attempt_id AS attempt_id;
    END IF;
END;
