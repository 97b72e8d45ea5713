-- Assertion helpers for the scenario files (included with \ir lib.sql). They live in pg_temp, so
-- they vanish with the session and never touch the schema under test.
\set ON_ERROR_STOP on
SET client_min_messages = warning;

-- Fails the script unless actual = expected (compared as text; NULL equals only NULL).
CREATE FUNCTION pg_temp.expect_eq(actual text, expected text, what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF actual IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'FAILED: %: expected %, got %', what,
            coalesce(expected, 'NULL'), coalesce(actual, 'NULL');
    END IF;
END $$;

CREATE FUNCTION pg_temp.expect(condition boolean, what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF condition IS NOT TRUE THEN
        RAISE EXCEPTION 'FAILED: %', what;
    END IF;
END $$;

-- Fails the script unless running `statement` raises an error whose message matches `pattern`.
CREATE FUNCTION pg_temp.expect_error(statement text, pattern text, what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE statement;
    EXCEPTION WHEN OTHERS THEN
        IF SQLERRM !~ pattern THEN
            RAISE EXCEPTION 'FAILED: %: error "%" does not match /%/', what, SQLERRM, pattern;
        END IF;
        RETURN;
    END;
    RAISE EXCEPTION 'FAILED: %: no error raised by %', what, statement;
END $$;

-- The newest change-log row.
CREATE FUNCTION pg_temp.last_change() RETURNS core.tb_entity_change_log
LANGUAGE sql AS $$
    SELECT * FROM core.tb_entity_change_log ORDER BY pk_entity_change_log DESC LIMIT 1
$$;

CREATE FUNCTION pg_temp.change_count() RETURNS bigint
LANGUAGE sql AS $$ SELECT count(*) FROM core.tb_entity_change_log $$;
