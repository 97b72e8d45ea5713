-- read_page: read_batch's rows as the node reads them — the same rows in the same order, each
-- with its row_to_json text and size; an excerpt past the row bound; the page ended by its byte
-- bound (the first row always comes, a closing row without a change says cut_short); an empty
-- page is one row with the batch's end.
\ir lib.sql

-- 4 transactions × 5 rows; one row with a large image.
SELECT format($$INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
               SELECT 'Thing', (%s * 5 + g)::text, 'INSERT', jsonb_build_object('seq', %s * 5 + g)
                 FROM generate_series(0, 4) AS g$$, t, t)
  FROM generate_series(0, 3) AS t \gexec
INSERT INTO core.tb_entity_change_log (object_type, object_id, modification_type, object_data)
VALUES ('Thing', 'big', 'INSERT', jsonb_build_object('blob', repeat('x', 5000)));
CREATE TEMP TABLE s1 AS SELECT pg_current_snapshot() AS snapshot;

-- Unbounded: exactly read_batch's rows, in order, with row_to_json's text and its size.
SELECT pg_temp.expect_eq(
    (SELECT string_agg(page.row_position::text, ',' ORDER BY ordinality)
       FROM s1, fraiseql_observers.read_page(NULL, s1.snapshot::text, NULL, 100, NULL, NULL,
                                             1000000, 10, 1000000) WITH ORDINALITY AS page),
    (SELECT string_agg(change.pk_entity_change_log::text, ',' ORDER BY ordinality)
       FROM s1, fraiseql_observers.read_batch(NULL, s1.snapshot, NULL, 100) WITH ORDINALITY AS change),
    'the rows of read_batch, in its order');
SELECT pg_temp.expect(
    (SELECT bool_and(page.row_text = row_to_json(change)::text
                     AND page.row_size = octet_length(row_to_json(change)::text)
                     AND NOT page.cut_short AND page.upto = s1.snapshot::text)
       FROM s1, fraiseql_observers.read_page(NULL, s1.snapshot::text, NULL, 100, NULL, NULL,
                                             1000000, 10, 1000000) AS page
       JOIN core.tb_entity_change_log AS change ON change.pk_entity_change_log = page.row_position),
    'each row''s row_to_json text and size, the batch''s end, not cut');

-- Row bound: the large row comes as an excerpt with its full size.
SELECT pg_temp.expect_eq(
    (SELECT page.row_text || ' ' || (page.row_size > 5000)::text
       FROM s1, fraiseql_observers.read_page(NULL, s1.snapshot::text, NULL, 100, NULL, NULL,
                                             1000, 12, 1000000) AS page
      WHERE page.row_size > 1000),
    '{"pk_entity_ true', 'a row over the row bound: its first characters, its full size');

-- Byte bound: rows until the bytes before a row reach the bound, then a closing row.
SELECT pg_temp.expect_eq(
    (SELECT count(page.row_position)::text || ' rows, closing row ' || count(*) FILTER (WHERE page.row_position IS NULL)::text
            || ', cut ' || bool_or(page.cut_short)::text
       FROM s1, fraiseql_observers.read_page(NULL, s1.snapshot::text, NULL, 100, NULL, NULL,
                                             1000000, 10,
                                             (SELECT 2 * octet_length(row_to_json(change)::text)
                                                FROM core.tb_entity_change_log AS change
                                               ORDER BY pk_entity_change_log LIMIT 1)) AS page),
    '2 rows, closing row 1, cut true', 'the page ends before the row that would start past the bound');
SELECT pg_temp.expect_eq(
    (SELECT count(page.row_position)::text || ' ' || bool_or(page.cut_short)::text
       FROM s1, fraiseql_observers.read_page(NULL, s1.snapshot::text, NULL, 100, NULL, NULL,
                                             1000000, 10, 1) AS page),
    '1 true', 'the first row always comes');
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text || ' ' || bool_or(page.cut_short)::text
       FROM s1, fraiseql_observers.read_page(NULL, s1.snapshot::text, NULL, 21, NULL, NULL,
                                             1000000, 10, 1000000) AS page),
    '21 false', 'a page that ends by its row count is not cut and has no closing row');

-- Partitions and keyset position pass through to read_batch.
SELECT pg_temp.expect_eq(
    (SELECT string_agg(page.row_position::text || ':' || page.row_partition::text, ',' ORDER BY page.row_position)
       FROM s1, fraiseql_observers.read_page(NULL, s1.snapshot::text, 10, 100, ARRAY[1, 3], 4,
                                             1000000, 10, 1000000) AS page),
    (SELECT string_agg(change.pk_entity_change_log::text || ':' || (change.entity_hash % 4)::text, ',' ORDER BY change.pk_entity_change_log)
       FROM s1, fraiseql_observers.read_batch(NULL, s1.snapshot, 10, 100, ARRAY[1, 3], 4) AS change),
    'partition filter and position as read_batch''s, each row with its partition');

-- Empty page: one row with the batch's end (a new snapshot when none is given).
SELECT pg_temp.expect_eq(
    (SELECT count(*)::text || ' ' || count(page.row_position)::text || ' '
            || (bool_and(page.upto IS NOT NULL AND NOT page.cut_short))::text
       FROM s1, fraiseql_observers.read_page(s1.snapshot, NULL, NULL, 100, NULL, NULL,
                                             1000000, 10, 1000000) AS page),
    '1 0 true', 'an empty page is one row with the batch''s end');
