-- 0015_history_errors_recent.sql — full-text history searches that match often stay fast.
--
-- `events search --text` asks for the newest rows whose error messages hold some words. The GIN
-- index (0012) finds every such row; when the words are common (one failing endpoint's message in
-- every tenth event), that is hundreds of thousands of rows to fetch and sort for a page of 50 —
-- and the planner, estimating the words as independent, cannot tell. With this index, a search
-- walks the rows that have errors newest first for a bounded number of them (history.rs), and
-- only falls back to the GIN index for what that walk did not reach: rare words.
--
-- Only rows with errors are in it (a few in a hundred), so it is small. On a partitioned table
-- the index is built on every partition; a large history is locked against writes while it is
-- built.

-- Checked first: a bare CREATE INDEX IF NOT EXISTS takes its lock before it sees the index
-- exists, so applying the migrations again would wait behind every open writer of the history.
DO $$
BEGIN
    IF to_regclass('fraiseql_observers.history_errors_recent_idx') IS NULL THEN
        CREATE INDEX history_errors_recent_idx
            ON fraiseql_observers.history (history_id)
            WHERE errors IS NOT NULL;
    END IF;
END
$$;
