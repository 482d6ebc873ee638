"""Posting with less work per call: one statement checks the rules and moves the balances.

Measured on 0003 with pgbench (server only, one transfer per database transaction):
ledger_post() plus its trigger took about 1.5 ms, and nearly all of it was fixed cost
per statement (plan start-up of large plans), not per row: the trigger's check and its
balance UPDATE were two large statements, and ledger_post() ran four more for an entry
of two legs. Here:

- the trigger checks every rule and moves the balances in one statement: the UPDATE
  applies a balance row's postings only where they continue it (recorded after its last
  posting, running balance from its amount), and the same statement says whether every
  rule held. Only when one did not does the exact path of 0003 run, to name it (the
  exception undoes the moves);
- ledger_post() has a path for one entry (the usual call: an API request, a task)
  with small statements; a batch keeps the set-based path of 0003.

The rules and their SQLSTATEs are those of 0003.
"""

from django.db import migrations

TRIGGER_SQL = r"""
CREATE OR REPLACE FUNCTION ledger_postings_inserted() RETURNS trigger LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off AS $$
DECLARE
  kept boolean;
  earliest timestamptz;
  latest timestamptz;
  bad record;
  unmoved bigint;
BEGIN
  -- Under READ COMMITTED each statement sees the closes committed before it (and
  -- period_close's table lock orders the two). An older snapshot (REPEATABLE READ)
  -- locks the periods concerned instead: one closed since fails to serialize.
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    PERFORM 1 FROM ledger_period p
     WHERE EXISTS (SELECT 1 FROM new_rows n
                    WHERE p.starts_at <= n.effective_at AND n.effective_at < p.ends_at)
       FOR SHARE;
  END IF;

  -- One statement: each balance row takes its postings only if they continue it (the
  -- first recorded after its last posting; every balance_after its amount plus the
  -- running sum), and the same pass says whether every rule held. The UPDATE locks the
  -- rows it moves (ledger_post holds them already, in order).
  WITH g AS MATERIALIZED (
    -- per balance row: what its postings add, and whether they all imply one opening
    -- balance (balance_after minus the running sum, in recorded order)
    SELECT y.account_id, y.asset_id, count(*) AS postings, sum(y.amount) AS total,
           min(y.recorded_at) AS first_at, max(y.recorded_at) AS last_at,
           min(y.opening) AS opening, min(y.opening) = max(y.opening) AS chained
      FROM (SELECT n.account_id, n.asset_id, n.amount, n.recorded_at,
                   n.balance_after - sum(n.amount) OVER (PARTITION BY n.account_id, n.asset_id
                                                         ORDER BY n.recorded_at, n.id)
                     AS opening
              FROM new_rows n) y
     GROUP BY y.account_id, y.asset_id
  ), moved AS (
    UPDATE ledger_balance m
       SET amount = m.amount + g.total, posting_count = m.posting_count + g.postings,
           updated_at = g.last_at
      FROM g
     WHERE m.account_id = g.account_id AND m.asset_id = g.asset_id
       AND g.chained AND m.amount = g.opening AND m.updated_at < g.first_at
    RETURNING m.account_id, m.asset_id
  )
  -- (per transaction, not per posting: one probe each; and every balance row moved)
  SELECT coalesce(bool_and(coalesce(
           t.reverses_id IS NULL
           AND t.created_xact = pg_current_xact_id()::text::bigint
           AND d.earliest = t.effective_at AND d.latest = t.effective_at
           AND t.effective_at <= t.recorded_at
           AND t.recorded_at >= transaction_timestamp()
           AND t.recorded_at <= clock_timestamp()
           AND d.dated_before_recorded
           AND d.last_recorded_at <= clock_timestamp() + interval '1 second', false)), true)
         AND (SELECT count(*) FROM moved) = (SELECT count(*) FROM g)
         AND NOT EXISTS (SELECT 1 FROM new_rows n GROUP BY n.transaction_id, n.asset_id
                          HAVING sum(n.amount) <> 0),
         min(t.effective_at), max(t.effective_at)
    INTO kept, earliest, latest
    FROM (SELECT n.transaction_id, min(n.effective_at) AS earliest,
                 max(n.effective_at) AS latest, max(n.recorded_at) AS last_recorded_at,
                 bool_and(n.effective_at <= n.recorded_at) AS dated_before_recorded
            FROM new_rows n GROUP BY n.transaction_id) d
    LEFT JOIN ledger_transaction t ON t.id = d.transaction_id;

  IF kept AND NOT EXISTS (SELECT 1 FROM ledger_period p
                           WHERE p.status = 'closed' AND p.starts_at <= latest
                             AND earliest < p.ends_at) THEN
    RETURN NULL;
  END IF;

  -- The exact path: which rule, with a message that names the row. Balance rows moved
  -- above were continued correctly; the others are read as they stand.
  WITH j AS MATERIALIZED (
    SELECT n.id, n.transaction_id, n.account_id, n.asset_id, n.amount, n.effective_at,
           n.recorded_at, n.balance_after, t.id AS tx_id, t.idempotency_key,
           t.created_xact, t.effective_at AS tx_effective_at,
           t.recorded_at AS tx_recorded_at, t.reverses_id
      FROM new_rows n LEFT JOIN ledger_transaction t ON t.id = n.transaction_id
  ), g AS MATERIALIZED (
    SELECT n.account_id, n.asset_id, max(n.recorded_at) AS last_at
      FROM new_rows n GROUP BY n.account_id, n.asset_id
  ), b AS MATERIALIZED (
    -- a row the fast path moved has the statement's last posting time (recorded_at is
    -- unique per balance row); the others stand as they were
    SELECT m.account_id, m.asset_id, m.amount, m.updated_at, m.updated_at = g.last_at AS moved
      FROM g JOIN ledger_balance m ON m.account_id = g.account_id AND m.asset_id = g.asset_id
  )
  SELECT v.code, v.message FROM (
      (SELECT 'TL004' AS code,
              CASE WHEN j.tx_id IS NULL
                   THEN format('transaction %s does not exist', j.transaction_id)
                   ELSE format('transaction %s was committed earlier; '
                               'postings cannot be added to it', j.transaction_id)
              END AS message
         FROM j WHERE j.tx_id IS NULL OR j.created_xact <> pg_current_xact_id()::text::bigint
        LIMIT 1)
      UNION ALL
      (SELECT 'TL006', format('effective time %s is in the future', j.tx_effective_at)
         FROM j WHERE j.tx_effective_at > j.tx_recorded_at LIMIT 1)
      UNION ALL
      (SELECT 'TL003', format('effective time %s falls in the closed period %s to %s',
                              j.tx_effective_at, p.starts_at, p.ends_at)
         FROM j JOIN ledger_period p
           ON p.status = 'closed' AND p.starts_at <= j.tx_effective_at
          AND j.tx_effective_at < p.ends_at
        LIMIT 1)
      UNION ALL
      (SELECT 'TL004',
              CASE WHEN j.effective_at <> j.tx_effective_at
                   THEN format('posting %s is dated %s, its transaction %s %s',
                               j.id, j.effective_at, j.transaction_id, j.tx_effective_at)
                   ELSE format('transaction %s (%s): recorded_at is the database''s',
                               j.transaction_id, j.idempotency_key)
              END
         FROM j WHERE j.effective_at <> j.tx_effective_at
                   OR j.tx_recorded_at < transaction_timestamp()
                   OR j.tx_recorded_at > clock_timestamp()
        LIMIT 1)
      UNION ALL
      (SELECT 'TL001', format('transaction %s (%s) does not balance: asset %s sums to %s',
                              j.transaction_id, min(j.idempotency_key),
                              (SELECT s.code FROM ledger_asset s WHERE s.id = j.asset_id),
                              sum(j.amount))
         FROM j GROUP BY j.transaction_id, j.asset_id HAVING sum(j.amount) <> 0
        LIMIT 1)
      UNION ALL
      (SELECT 'TL008', format('transaction %s (%s) reverses %s but does not negate it',
                              r.tx_id, r.idempotency_key, r.reverses_id)
         FROM (SELECT DISTINCT j.tx_id, j.idempotency_key, j.reverses_id
                 FROM j WHERE j.reverses_id IS NOT NULL) r
        WHERE EXISTS (SELECT 1 FROM ledger_posting p
                       WHERE p.transaction_id IN (r.tx_id, r.reverses_id)
                       GROUP BY p.account_id, p.asset_id HAVING sum(p.amount) <> 0)
        LIMIT 1)
      UNION ALL
      (SELECT 'TL009', format('posting %s (account %s, asset %s) recorded at %s with '
                              'balance_after %s does not follow the balance: expected %s, '
                              'after %s', x.id, x.account_id, x.asset_id, x.recorded_at,
                              x.balance_after, x.expected, x.previous_at)
         FROM (SELECT j.id, j.account_id, j.asset_id, j.effective_at, j.recorded_at,
                      j.balance_after,
                      coalesce(b.amount, 0) + sum(j.amount) OVER w AS expected,
                      coalesce(lag(j.recorded_at) OVER w, b.updated_at, '-infinity')
                        AS previous_at
                 FROM j LEFT JOIN b ON b.account_id = j.account_id AND b.asset_id = j.asset_id
                WHERE NOT coalesce(b.moved, false)
               WINDOW w AS (PARTITION BY j.account_id, j.asset_id
                            ORDER BY j.recorded_at, j.id)) x
        WHERE x.balance_after <> x.expected OR x.recorded_at <= x.previous_at
           OR x.effective_at > x.recorded_at
           OR x.recorded_at > clock_timestamp() + interval '1 second'
        LIMIT 1)
    ) v LIMIT 1
    INTO bad;
  IF FOUND THEN
    RAISE EXCEPTION USING ERRCODE = bad.code, MESSAGE = bad.message;
  END IF;

  -- Every rule holds, yet some balance row did not move: it is missing (a writer that
  -- did not open it first), or another posting moved it since it was read.
  WITH g AS (
    SELECT n.account_id, n.asset_id, sum(n.amount) AS total, count(*) AS postings,
           max(n.recorded_at) AS last_at
      FROM new_rows n GROUP BY n.account_id, n.asset_id
  ), opened AS (
    INSERT INTO ledger_balance (account_id, asset_id, amount, posting_count, updated_at)
    SELECT g.account_id, g.asset_id, g.total, g.postings, g.last_at
      FROM g
     WHERE NOT EXISTS (SELECT 1 FROM ledger_balance b
                        WHERE b.account_id = g.account_id AND b.asset_id = g.asset_id)
     ORDER BY g.account_id, g.asset_id
    ON CONFLICT (account_id, asset_id) DO NOTHING
    RETURNING account_id, asset_id
  )
  SELECT count(*) INTO unmoved
    FROM g
   WHERE NOT EXISTS (SELECT 1 FROM opened o
                      WHERE o.account_id = g.account_id AND o.asset_id = g.asset_id)
     AND NOT EXISTS (SELECT 1 FROM ledger_balance b
                      WHERE b.account_id = g.account_id AND b.asset_id = g.asset_id
                        AND b.updated_at = g.last_at);
  IF unmoved > 0 THEN
    -- Only a writer that did not lock first gets here. Nothing is written; posting
    -- again works.
    RAISE EXCEPTION USING ERRCODE = '40001',
      MESSAGE = 'a balance was moved by a concurrent posting; post again';
  END IF;
  RETURN NULL;
END $$;
"""

POST_SQL = r"""
CREATE OR REPLACE FUNCTION ledger_post(
  p_keys text[], p_hashes text[], p_descriptions text[], p_effective_at timestamptz[],
  p_metadata text[], p_reverses bigint[],
  p_leg_entry int[], p_leg_account text[], p_leg_asset text[], p_leg_amount numeric[]
) RETURNS TABLE (transaction_id bigint, created boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
  v_created_ord bigint[];
  v_created_id bigint[];
  -- The postings of the entries this call creates, as arrays ("new_"); the legs of all
  -- entries, resolved ("l_"); parameters are "p_".
  new_id bigint[];
  new_tx bigint[];
  new_account bigint[];
  new_asset bigint[];
  new_amount numeric[];
  new_effective timestamptz[];
  v_pairs bigint;
  v_locked bigint;
  v_now timestamptz;
  l_entry bigint[];
  l_id bigint[];
  l_account bigint[];
  l_asset bigint[];
  l_amount numeric[];
  bad record;
  -- one entry ("v_", "k_" for its locked balance rows, "e_" for its postings)
  n int;
  i int;
  j int;
  v_tx bigint;
  v_first bigint;
  v_effective timestamptz;
  v_hash text;
  k_account bigint[];
  k_asset bigint[];
  k_amount numeric[];
  k_at timestamptz[];
  e_balance numeric[];
  e_at timestamptz[];
BEGIN
  -- One entry of a few legs (an API request, a task): small statements, and the
  -- running balances computed here. Unknown codes fall through to the set path, which
  -- names them.
  n := cardinality(p_leg_entry);
  IF cardinality(p_keys) = 1 AND n <= 32 THEN
    l_account := array_fill(NULL::bigint, ARRAY[n]);
    l_asset := array_fill(NULL::bigint, ARRAY[n]);
    FOR i IN 1..n LOOP
      l_account[i] := (SELECT a.id FROM ledger_account a WHERE a.code = p_leg_account[i]);
      l_asset[i] := CASE WHEN i > 1 AND p_leg_asset[i] = p_leg_asset[i - 1] THEN l_asset[i - 1]
                         ELSE (SELECT s.id FROM ledger_asset s WHERE s.code = p_leg_asset[i]) END;
    END LOOP;
    IF array_position(l_account, NULL) IS NULL AND array_position(l_asset, NULL) IS NULL THEN
      -- Lock the balance rows in (account, asset) order, as every poster does; open the
      -- missing ones at zero first.
      FOR attempt IN 1..2 LOOP
        SELECT array_agg(b.account_id), array_agg(b.asset_id), array_agg(b.amount),
               array_agg(b.updated_at)
          INTO k_account, k_asset, k_amount, k_at
          FROM (SELECT b.account_id, b.asset_id, b.amount, b.updated_at FROM ledger_balance b
                 WHERE (b.account_id, b.asset_id) IN (SELECT * FROM unnest(l_account, l_asset))
                 ORDER BY b.account_id, b.asset_id FOR UPDATE) b;
        EXIT WHEN coalesce(cardinality(k_account), 0)
                  = (SELECT count(DISTINCT (u.account, u.asset))
                       FROM unnest(l_account, l_asset) AS u(account, asset));
        INSERT INTO ledger_balance (account_id, asset_id, amount, posting_count, updated_at)
        SELECT DISTINCT u.account, u.asset, 0, 0, '-infinity'::timestamptz
          FROM unnest(l_account, l_asset) AS u(account, asset)
         ORDER BY 1, 2
        ON CONFLICT (account_id, asset_id) DO NOTHING;
      END LOOP;
      -- Under the locks: one instant, the postings' recorded times and running balances.
      v_now := clock_timestamp();
      e_balance := array_fill(NULL::numeric, ARRAY[n]);
      e_at := array_fill(NULL::timestamptz, ARRAY[n]);
      FOR i IN 1..n LOOP
        j := 1;
        WHILE k_account[j] <> l_account[i] OR k_asset[j] <> l_asset[i] LOOP
          j := j + 1;
        END LOOP;
        k_amount[j] := k_amount[j] + p_leg_amount[i];
        k_at[j] := greatest(k_at[j] + interval '1 microsecond', v_now);
        e_balance[i] := k_amount[j];
        e_at[i] := k_at[j];
      END LOOP;
      v_first := nextval('ledger_posting_id_seq'::regclass);
      INSERT INTO ledger_transaction AS t
             (idempotency_key, content_hash, description, effective_at, recorded_at, metadata,
              reverses_id, first_posting_id)
      VALUES (p_keys[1], p_hashes[1], p_descriptions[1], coalesce(p_effective_at[1], v_now),
              v_now, p_metadata[1]::jsonb, p_reverses[1], v_first)
      ON CONFLICT (idempotency_key) DO NOTHING
      RETURNING t.id, t.effective_at INTO v_tx, v_effective;
      IF v_tx IS NULL THEN
        SELECT t.id, t.content_hash INTO v_tx, v_hash
          FROM ledger_transaction t WHERE t.idempotency_key = p_keys[1];
        IF v_tx IS NULL THEN  -- its poster rolled back after we waited for it
          RAISE EXCEPTION USING ERRCODE = '40001',
            MESSAGE = format('transaction %s was being posted concurrently; post again',
                             p_keys[1]);
        ELSIF v_hash <> p_hashes[1] THEN
          RAISE EXCEPTION USING ERRCODE = 'TL010',
            DETAIL = json_build_object('idempotency_key', p_keys[1], 'transaction_id', v_tx),
            MESSAGE = format('idempotency key %s was already posted with different content',
                             p_keys[1]);
        END IF;
        RETURN QUERY SELECT v_tx, false;
        RETURN;
      END IF;
      -- Posting ids in leg order, the first drawn above (the transaction names it).
      INSERT INTO ledger_posting
             (id, transaction_id, account_id, asset_id, amount, effective_at, recorded_at,
              balance_after)
      SELECT CASE WHEN u.ord = 1 THEN v_first
                  ELSE nextval('ledger_posting_id_seq'::regclass) END,
             v_tx, u.account, u.asset, u.amount, v_effective, u.recorded_at, u.balance_after
        FROM unnest(l_account, l_asset, p_leg_amount, e_at, e_balance)
             WITH ORDINALITY AS u(account, asset, amount, recorded_at, balance_after, ord);
      RETURN QUERY SELECT v_tx, true;
      RETURN;
    END IF;
  END IF;

  -- A batch: set-based, four statements whatever its size.
  -- 1. Resolve the codes, draw posting ids (each transaction names its first posting)
  -- and lock the balance rows in (account, asset) order, as every poster does, so that
  -- posters wait for one another but never deadlock.
  WITH legs AS MATERIALIZED (
    SELECT l.ord, l.entry, a.id AS account, s.id AS asset, l.amount, l.id
      FROM (SELECT u.*, nextval('ledger_posting_id_seq'::regclass) AS id  -- in leg order
              FROM unnest(p_leg_entry, p_leg_account, p_leg_asset, p_leg_amount)
                   WITH ORDINALITY AS u(entry, account, asset, amount, ord)) l
      JOIN ledger_account a ON a.code = l.account
      JOIN ledger_asset s ON s.code = l.asset
  ), pairs AS MATERIALIZED (
    SELECT DISTINCT legs.account, legs.asset FROM legs
  ), locked AS MATERIALIZED (
    SELECT b.account_id FROM ledger_balance b
      JOIN pairs p ON b.account_id = p.account AND b.asset_id = p.asset
     ORDER BY b.account_id, b.asset_id
       FOR UPDATE OF b
  )
  SELECT array_agg(x.entry), array_agg(x.id), array_agg(x.account), array_agg(x.asset),
         array_agg(x.amount), (SELECT count(*) FROM pairs), (SELECT count(*) FROM locked)
    INTO l_entry, l_id, l_account, l_asset, l_amount, v_pairs, v_locked
    FROM (SELECT * FROM legs ORDER BY legs.ord) x;
  IF coalesce(cardinality(l_id), 0) < cardinality(p_leg_entry) THEN
    -- DETAIL carries, as a JSON object, what the caller acts on (ledger/exceptions.py).
    SELECT (SELECT array_agg(DISTINCT x.code ORDER BY x.code) FROM unnest(p_leg_account) x(code)
             WHERE NOT EXISTS (SELECT 1 FROM ledger_account a WHERE a.code = x.code)) AS accounts,
           (SELECT array_agg(DISTINCT x.code ORDER BY x.code) FROM unnest(p_leg_asset) x(code)
             WHERE NOT EXISTS (SELECT 1 FROM ledger_asset s WHERE s.code = x.code)) AS assets
      INTO bad;
    IF bad.accounts IS NOT NULL THEN
      RAISE EXCEPTION USING ERRCODE = 'TL011',
        DETAIL = json_build_object('accounts', bad.accounts[1:100]),
        MESSAGE = 'unknown accounts: ' || array_to_string(bad.accounts[1:10], ', ');
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'TL012',
      DETAIL = json_build_object('assets', bad.assets[1:100]),
      MESSAGE = 'unknown assets: ' || array_to_string(bad.assets[1:10], ', ');
  END IF;
  -- 2. A balance row missing is opened at zero (in the same order), then locked.
  IF v_locked < v_pairs THEN
    INSERT INTO ledger_balance (account_id, asset_id, amount, posting_count, updated_at)
    SELECT DISTINCT p.account, p.asset, 0, 0, '-infinity'::timestamptz
      FROM unnest(l_account, l_asset) AS p(account, asset)
     ORDER BY 1, 2
    ON CONFLICT (account_id, asset_id) DO NOTHING;
    PERFORM 1 FROM ledger_balance b
     WHERE (b.account_id, b.asset_id) IN (SELECT * FROM unnest(l_account, l_asset))
     ORDER BY b.account_id, b.asset_id FOR UPDATE;
  END IF;

  -- 3. Under the locks, one instant for the whole batch: it is the recorded time of the
  -- transactions, the effective time of those that give none, and where each balance
  -- row's postings continue (one microsecond apart, after the row's last one). So an
  -- entry posted "now" is recorded within microseconds of its effective time, which
  -- keeps point-in-time reads to an index probe (ledger/selectors.py).
  v_now := clock_timestamp();
  WITH ins AS (
    INSERT INTO ledger_transaction AS t
           (idempotency_key, content_hash, description, effective_at, recorded_at, metadata,
            reverses_id, first_posting_id)
    SELECT u.key, u.hash, u.description, coalesce(u.effective_at, v_now), v_now,
           u.metadata::jsonb, u.reverses_id, f.first_id
      FROM unnest(p_keys, p_hashes, p_descriptions, p_effective_at, p_metadata, p_reverses)
           WITH ORDINALITY AS u(key, hash, description, effective_at, metadata, reverses_id, ord)
      JOIN (SELECT l.entry, min(l.id) AS first_id FROM unnest(l_entry, l_id) AS l(entry, id)
             GROUP BY l.entry) f ON f.entry = u.ord
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING t.id, t.idempotency_key, t.effective_at
  ), created AS MATERIALIZED (
    SELECT k.ord, ins.id, ins.effective_at
      FROM ins JOIN unnest(p_keys) WITH ORDINALITY AS k(key, ord) ON k.key = ins.idempotency_key
  ), legs AS (
    SELECT l.id, c.id AS tx, l.account, l.asset, l.amount, c.effective_at
      FROM unnest(l_entry, l_id, l_account, l_asset, l_amount)
           AS l(entry, id, account, asset, amount)
      JOIN created c ON c.ord = l.entry
  )
  SELECT (SELECT array_agg(c.ord ORDER BY c.ord) FROM created c),
         (SELECT array_agg(c.id ORDER BY c.ord) FROM created c),
         array_agg(legs.id), array_agg(legs.tx), array_agg(legs.account), array_agg(legs.asset),
         array_agg(legs.amount), array_agg(legs.effective_at)
    INTO v_created_ord, v_created_id,
         new_id, new_tx, new_account, new_asset, new_amount, new_effective
    FROM legs;

  IF coalesce(cardinality(v_created_ord), 0) < cardinality(p_keys) THEN
    SELECT k.key, t.id INTO bad
      FROM unnest(p_keys, p_hashes) WITH ORDINALITY AS k(key, hash, ord)
      LEFT JOIN ledger_transaction t ON t.idempotency_key = k.key
     WHERE NOT k.ord = ANY (coalesce(v_created_ord, '{}'))
       AND (t.id IS NULL OR t.content_hash <> k.hash)
     LIMIT 1;
    IF FOUND AND bad.id IS NULL THEN  -- its poster rolled back after we waited for it
      RAISE EXCEPTION USING ERRCODE = '40001',
        MESSAGE = format('transaction %s was being posted concurrently; post again', bad.key);
    ELSIF FOUND THEN
      RAISE EXCEPTION USING ERRCODE = 'TL010',
        DETAIL = json_build_object('idempotency_key', bad.key, 'transaction_id', bad.id),
        MESSAGE = format('idempotency key %s was already posted with different content',
                         bad.key);
    END IF;
  END IF;

  -- 4. The postings of the entries created here (a replayed entry has its own already).
  IF v_created_ord IS NOT NULL THEN
    INSERT INTO ledger_posting
           (id, transaction_id, account_id, asset_id, amount, effective_at, recorded_at,
            balance_after)
    SELECT l.id, l.tx, l.account, l.asset, l.amount, l.effective_at,
           greatest(b.updated_at + interval '1 microsecond', v_now)
             + (row_number() OVER w - 1) * interval '1 microsecond',
           b.amount + sum(l.amount) OVER w
      FROM unnest(new_id, new_tx, new_account, new_asset, new_amount, new_effective)
           AS l(id, tx, account, asset, amount, effective_at)
      JOIN ledger_balance b ON b.account_id = l.account AND b.asset_id = l.asset
    WINDOW w AS (PARTITION BY l.account, l.asset ORDER BY l.id);
  END IF;

  IF coalesce(cardinality(v_created_ord), 0) = cardinality(p_keys) THEN
    RETURN QUERY SELECT k.id, true FROM unnest(v_created_id) AS k(id);
  ELSE
    RETURN QUERY
      SELECT t.id, coalesce(k.ord = ANY (v_created_ord), false)
        FROM unnest(p_keys) WITH ORDINALITY AS k(key, ord)
        JOIN ledger_transaction t ON t.idempotency_key = k.key
       ORDER BY k.ord;
  END IF;
END $$;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0003_set_based_posting"),
    ]

    operations = [
        # Irreversible like 0003: the rules are the same, only their cost changes.
        migrations.RunSQL(TRIGGER_SQL),
        migrations.RunSQL(POST_SQL),
    ]
