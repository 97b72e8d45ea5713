-- 0016_history_export.sql — how far the history has been copied to a search backend
-- (Elasticsearch/OpenSearch, `history: {backend: search}`). Owned by src/history.rs.
--
-- One row per target (the index prefix): every history row with `history_id <= cursor` has been
-- indexed (or refused by the backend and counted as dropped); rows above it are indexed when the
-- exporter reaches them. The exporter writes a document per row with the row's id as the
-- document id, so rows above the cursor that were indexed before a restart are indexed again,
-- not doubled.

CREATE TABLE IF NOT EXISTS fraiseql_observers.history_export (
    target     text        PRIMARY KEY,
    cursor     bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
