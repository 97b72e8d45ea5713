-- 0021_notify_partitions.sql — a change-log notification names the partitions it concerns.
--
-- Before: every INSERT statement on the change log sent an empty notification, and every
-- listener of every node read a page on it — an idle partition too. Now the statement trigger
-- takes the inserted rows as a transition table and the payload lists the partitions they belong
-- to (`entity_hash % partition count`, ascending, comma-separated: `0,3,5`), so a node wakes only
-- those partitions' listeners. Before the partition count is recorded (no node has started) the
-- payload stays empty, which wakes every partition, as before; a statement that inserted no row
-- notifies nothing.
--
-- PostgreSQL folds identical notifications of a transaction into one; a transaction whose
-- statements touch different partitions now sends one per distinct list. Notifications stay a
-- hint: the reader never depends on them (polling covers a missed one).
--
-- The trigger runs with the writer's rights, and FraiseQL's writers need not see the service's
-- schema: the partition count comes through core.observer_partition_count(), which runs as its
-- owner and returns nothing but the count.

CREATE OR REPLACE FUNCTION core.observer_partition_count()
RETURNS int
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $function$
    SELECT partition_count FROM fraiseql_observers.cluster
$function$;

COMMENT ON FUNCTION core.observer_partition_count() IS
    'The partition count the service''s nodes split the change log by (NULL before the first node '
    'started); readable by change-log writers without access to the fraiseql_observers schema.';

CREATE OR REPLACE FUNCTION core.observer_change_log_notify_partitions()
RETURNS trigger
LANGUAGE plpgsql
AS $function$
DECLARE
    partition_count constant int := core.observer_partition_count();
    touched text;
BEGIN
    IF coalesce(current_setting('fraiseql_observers.notify', true), '') IN ('off', 'false', '0') THEN
        RETURN NULL;
    END IF;
    IF partition_count IS NULL THEN
        IF EXISTS (SELECT 1 FROM inserted) THEN
            PERFORM pg_notify('fraiseql_observers_change_log', '');
        END IF;
        RETURN NULL;
    END IF;
    SELECT string_agg(touched_partition.partition::text, ',' ORDER BY touched_partition.partition)
      INTO touched
      FROM (SELECT DISTINCT (inserted.entity_hash % partition_count)::int AS partition
              FROM inserted
             WHERE inserted.entity_hash IS NOT NULL) AS touched_partition;
    IF touched IS NOT NULL THEN
        PERFORM pg_notify('fraiseql_observers_change_log', touched);
    END IF;
    RETURN NULL;
END
$function$;

COMMENT ON FUNCTION core.observer_change_log_notify_partitions() IS
    'AFTER INSERT statement trigger on core.tb_entity_change_log: NOTIFY fraiseql_observers_change_log '
    'with the partitions of the inserted rows (empty before the partition count is recorded).';

-- Swapped only when the trigger is still the previous one: re-running this file takes no lock
-- on the change log (see 0001).
DO $migration$
DECLARE
    log_table constant regclass := 'core.tb_entity_change_log'::regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = log_table AND tgname = 'observer_change_log_notify'
                     AND tgfoid = 'core.observer_change_log_notify_partitions()'::regprocedure
                     AND tgnewtable IS NOT NULL) THEN
        DROP TRIGGER IF EXISTS observer_change_log_notify ON core.tb_entity_change_log;
        CREATE TRIGGER observer_change_log_notify
            AFTER INSERT ON core.tb_entity_change_log
            REFERENCING NEW TABLE AS inserted
            FOR EACH STATEMENT EXECUTE FUNCTION core.observer_change_log_notify_partitions();
    END IF;
END
$migration$;
