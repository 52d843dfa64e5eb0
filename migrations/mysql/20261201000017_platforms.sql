-- amoCRM and Kommo integrations side by side: every state and connection names its platform
-- ('amocrm' or 'kommo'); rows from before are amoCRM's. An account id is unique per platform,
-- since the two platforms number their accounts apart. The id leads the unique index, so a
-- lookup by bare id (the token API's) uses it too.
ALTER TABLE amocrm_oauth_states ADD COLUMN platform VARCHAR(16) NOT NULL DEFAULT 'amocrm';
ALTER TABLE amocrm_tokens
    ADD COLUMN platform VARCHAR(16) NOT NULL DEFAULT 'amocrm',
    ADD UNIQUE INDEX amocrm_tokens_account_id_platform (account_id, platform),
    DROP INDEX account_id;
