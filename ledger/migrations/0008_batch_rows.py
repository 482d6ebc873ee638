"""A batch reads its legs per balance row, then once on insert: no per-leg arrays between.

Measured on 0007 with a 1,000-entry batch of two-leg transfers over 100 accounts
(auto_explain, per statement): the statement that resolved the codes and placed each leg
in its balance row's run took 9.2 ms of a 43 ms call. It materialized the 2,000 legs
twice (with their posting ids, then with their runs), looked each leg's codes up in a
JSON map, sorted them for the window, and built eight 2,000-element arrays that the
posting statement unpacked again; the transactions' INSERT then returned its ids and
joined them back to the keys to learn which entry got which.

Now:
- one statement works per balance row: it groups the legs by (account code, asset
  code), resolves each pair's codes once, totals it and finds its row, in (account,
  asset) order: 100 rows for 2,000 legs;
- the ids are drawn up front, in entry order and leg order (one sequence call each, as
  before), so that neither INSERT returns anything when every entry is new;
- the posting statement joins each leg to its row by code and computes its run there,
  in the one sort it needed anyway, and inserts in (account, asset) order as before;
- the input check also finds each entry's first leg, whose posting the transaction
  names;
- the hot statements unpack their arrays in the select list, where unnest streams its
  rows; in FROM it first copies them all into a tuplestore (about 2 ms a batch).
The per-row statement runs after the transactions' INSERT, over the legs of the entries
it created, so that a replay (a key posted before, which still falls back to ON
CONFLICT) needs no second copy of it. What a caller can see change: transaction ids
follow the entries' order in the call, not their keys' (keys are still taken in key
order); a batch that names an unknown code is refused for it only after its
transactions' INSERT: what that INSERT raises (a key replayed with other content, a
second reversal, metadata that is not JSON) or waits for (a concurrent poster of one of
its keys, a period being closed), and a future date, come first (refused either way,
nothing written); a replayed entry posts nothing, so its legs' codes are not looked up
again (the hash it matched covers them).

Measured: the same 1,000-entry batches alternated between 0007's function and this one
(before the select-list unnests), 80 times each on two databases of one server: 45.4
against 40.5 ms a call (medians, commit included), backend CPU 47.1 against 40.1 ms. The
select-list unnests took another 2.1 to 2.5 ms of backend CPU (60 alternations, twice).
"""

import importlib

from django.db import migrations

trusted_poster = importlib.import_module("ledger.migrations.0006_trusted_poster")

# CREATE OR REPLACE keeps the owner (ledger_poster) and the grants of 0006; the SET
# clauses are the definition's, so search_path is said here again.
POST_SQL = r"""
CREATE OR REPLACE FUNCTION ledger_post(
  p_keys text[], p_hashes text[], p_descriptions text[], p_effective_at timestamptz[],
  p_metadata text[], p_reverses bigint[],
  p_leg_entry int[], p_leg_account text[], p_leg_asset text[], p_leg_amount numeric[]
) RETURNS TABLE (transaction_id bigint, created boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  -- parameters are "p_"; per entry "e_" (by position), per leg "l_", per balance row
  -- "k_" (in (account, asset) order)
  v_replayed boolean;
  v_unknown bigint;
  e_first_leg bigint[];
  k_account_code text[];
  k_asset_code text[];
  v_created_id bigint[];
  e_tx bigint[];
  e_effective timestamptz[];
  v_instants timestamptz[];
  v_missing bigint;
  v_now timestamptz;
  l_id bigint[];
  l_account bigint[];
  l_asset bigint[];
  k_total numeric[];
  bad record;
  v_entries int;
  -- one entry ("v_", "k_" for its locked balance rows, "e_" for its postings)
  n int;
  i int;
  j int;
  v_tx bigint;
  v_first bigint;
  v_locked_at timestamptz;
  v_effective timestamptz;
  v_hash text;
  k_account bigint[];
  k_asset bigint[];
  k_amount numeric[];
  k_at timestamptz[];
  k_count int[];
  e_balance numeric[];
  e_at timestamptz[];
BEGIN
  -- Checked on the input before anything is written, since no trigger checks this
  -- writer: the arrays are what the code below reads (one dimension, from 1, one
  -- element per entry or per leg), amounts are whole smallest units (a fraction would
  -- be rounded where it is stored, after the sums below were taken), every leg names an
  -- entry and every entry has legs, and each entry balances per asset. (A zero amount
  -- is refused by the postings' check constraint.)
  v_entries := cardinality(p_keys);
  n := cardinality(p_leg_entry);
  IF NOT coalesce(
       array_ndims(p_keys) = 1 AND array_lower(p_keys, 1) = 1
       AND array_ndims(p_hashes) = 1 AND array_lower(p_hashes, 1) = 1
       AND cardinality(p_hashes) = v_entries
       AND array_ndims(p_descriptions) = 1 AND array_lower(p_descriptions, 1) = 1
       AND cardinality(p_descriptions) = v_entries
       AND array_ndims(p_effective_at) = 1 AND array_lower(p_effective_at, 1) = 1
       AND cardinality(p_effective_at) = v_entries
       AND array_ndims(p_metadata) = 1 AND array_lower(p_metadata, 1) = 1
       AND cardinality(p_metadata) = v_entries
       AND array_ndims(p_reverses) = 1 AND array_lower(p_reverses, 1) = 1
       AND cardinality(p_reverses) = v_entries
       AND array_ndims(p_leg_entry) = 1 AND array_lower(p_leg_entry, 1) = 1
       AND array_ndims(p_leg_account) = 1 AND array_lower(p_leg_account, 1) = 1
       AND cardinality(p_leg_account) = n
       AND array_ndims(p_leg_asset) = 1 AND array_lower(p_leg_asset, 1) = 1
       AND cardinality(p_leg_asset) = n
       AND array_ndims(p_leg_amount) = 1 AND array_lower(p_leg_amount, 1) = 1
       AND cardinality(p_leg_amount) = n, false) THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'ledger_post takes one-dimensional arrays indexed from 1: one element per '
                'entry (keys, hashes, descriptions, effective times, metadata, reversals) '
                'and one per leg (entry, account, asset, amount)';
  END IF;
  SELECT count(*) AS entries, bool_and(e.named) AS named, bool_and(e.whole) AS whole,
         bool_and(e.balanced) AS balanced, array_agg(e.first ORDER BY e.entry) AS first
    INTO bad
    FROM (SELECT g.entry, bool_and(coalesce(g.entry BETWEEN 1 AND v_entries, false)) AS named,
                 bool_and(g.whole) AS whole, bool_and(g.total = 0) AS balanced,
                 min(g.first) AS first
            FROM (SELECT u.entry, sum(u.amount) AS total, min(u.ord) AS first,
                         bool_and(coalesce(abs(u.amount) < 1e38 AND u.amount = trunc(u.amount),
                                           true)) AS whole
                    FROM (SELECT unnest(p_leg_entry) AS entry, unnest(p_leg_asset) AS asset,
                                 unnest(p_leg_amount) AS amount, generate_series(1, n) AS ord) u
                   GROUP BY u.entry, u.asset) g
           GROUP BY g.entry) e;
  IF NOT bad.whole THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'leg amounts are whole numbers of the asset''s smallest unit';
  ELSIF NOT bad.named OR bad.entries <> v_entries THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = format('each leg names an entry 1..%s, and each entry has legs', v_entries);
  ELSIF NOT bad.balanced THEN
    SELECT u.entry, u.asset, sum(u.amount) AS total INTO bad
      FROM unnest(p_leg_entry, p_leg_asset, p_leg_amount) AS u(entry, asset, amount)
     GROUP BY u.entry, u.asset HAVING sum(u.amount) <> 0
     ORDER BY u.entry, u.asset LIMIT 1;
    RAISE EXCEPTION USING ERRCODE = 'TL001',
      MESSAGE = format('transaction (%s) does not balance: asset %s sums to %s',
                       p_keys[bad.entry], bad.asset, bad.total);
  END IF;
  e_first_leg := bad.first;

  -- One entry of a few legs (an API request, a task): small statements, and the
  -- running balances computed here. Unknown codes fall through to the set path, which
  -- names them.
  IF v_entries = 1 AND n <= 32 THEN
    l_account := array_fill(NULL::bigint, ARRAY[n]);
    l_asset := array_fill(NULL::bigint, ARRAY[n]);
    FOR i IN 1..n LOOP
      l_account[i] := (SELECT a.id FROM ledger_account a WHERE a.code = p_leg_account[i]);
      l_asset[i] := CASE WHEN i > 1 AND p_leg_asset[i] = p_leg_asset[i - 1] THEN l_asset[i - 1]
                         ELSE (SELECT s.id FROM ledger_asset s WHERE s.code = p_leg_asset[i]) END;
    END LOOP;
    IF array_position(l_account, NULL) IS NULL AND array_position(l_asset, NULL) IS NULL THEN
      v_now := clock_timestamp();
      v_effective := coalesce(p_effective_at[1], v_now);
      IF v_effective > v_now THEN
        RAISE EXCEPTION USING ERRCODE = 'TL006',
          MESSAGE = format('effective time %s is in the future', v_effective);
      END IF;
      -- The transaction first, then the balance rows: every poster takes its keys
      -- before its balance rows (see ledger_post_transfer), so none holds a row while
      -- it waits for a key.
      INSERT INTO ledger_transaction AS t
             (idempotency_key, content_hash, description, effective_at, recorded_at,
              metadata, reverses_id, first_posting_id)
      VALUES (p_keys[1], p_hashes[1], p_descriptions[1], v_effective, v_now,
              p_metadata[1]::jsonb, p_reverses[1], nextval('ledger_posting_id_seq'::regclass))
      ON CONFLICT (idempotency_key) DO NOTHING
      RETURNING t.id, t.first_posting_id INTO v_tx, v_first;
      IF v_tx IS NULL THEN
        SELECT t.id, t.content_hash INTO v_tx, v_hash
          FROM ledger_transaction t WHERE t.idempotency_key = p_keys[1];
        IF v_tx IS NULL THEN  -- its poster rolled back after we waited for it
          RAISE EXCEPTION USING ERRCODE = '40001',
            MESSAGE = format('transaction %s was being posted concurrently; post again',
                             p_keys[1]);
        ELSIF v_hash IS DISTINCT FROM p_hashes[1] THEN
          RAISE EXCEPTION USING ERRCODE = 'TL010',
            DETAIL = json_build_object('idempotency_key', p_keys[1], 'transaction_id', v_tx),
            MESSAGE = format('idempotency key %s was already posted with different content',
                             p_keys[1]);
        END IF;
        RETURN QUERY SELECT v_tx, false;
        RETURN;
      END IF;
      -- After the INSERT, which holds the lock period_close waits for: every close
      -- committed before it is seen; one that is not has to wait for this commit.
      PERFORM ledger_refuse_closed(ARRAY[v_effective]);

      -- Lock the balance rows in (account, asset) order, as every poster does; a
      -- missing one is opened in that order first (see ledger_post_transfer).
      IF EXISTS (SELECT 1 FROM unnest(l_account, l_asset) AS u(account, asset)
                  WHERE NOT EXISTS (SELECT 1 FROM ledger_balance b
                                     WHERE b.account_id = u.account AND b.asset_id = u.asset))
      THEN
        PERFORM ledger_open_balances(l_account, l_asset);
      END IF;
      SELECT array_agg(b.account_id), array_agg(b.asset_id), array_agg(b.amount),
             array_agg(b.updated_at)
        INTO k_account, k_asset, k_amount, k_at
        FROM (SELECT b.account_id, b.asset_id, b.amount, b.updated_at FROM ledger_balance b
               WHERE (b.account_id, b.asset_id) IN (SELECT * FROM unnest(l_account, l_asset))
               ORDER BY b.account_id, b.asset_id FOR UPDATE) b;
      -- Under the locks: the postings' recorded times (after any wait for the locks, so
      -- never before the effective time) and running balances.
      v_locked_at := clock_timestamp();
      e_balance := array_fill(NULL::numeric, ARRAY[n]);
      e_at := array_fill(NULL::timestamptz, ARRAY[n]);
      k_count := array_fill(0, ARRAY[cardinality(k_account)]);
      FOR i IN 1..n LOOP
        j := 1;
        WHILE k_account[j] <> l_account[i] OR k_asset[j] <> l_asset[i] LOOP
          j := j + 1;
        END LOOP;
        k_amount[j] := k_amount[j] + p_leg_amount[i];
        k_at[j] := greatest(k_at[j] + interval '1 microsecond', v_locked_at);
        k_count[j] := k_count[j] + 1;
        e_balance[i] := k_amount[j];
        e_at[i] := k_at[j];
      END LOOP;
      -- The postings in leg order (the first id is the one the transaction names) and
      -- the balance rows, in one statement.
      WITH posted AS (
        INSERT INTO ledger_posting
               (id, transaction_id, account_id, asset_id, amount, effective_at, recorded_at,
                balance_after)
        SELECT CASE WHEN u.ord = 1 THEN v_first
                    ELSE nextval('ledger_posting_id_seq'::regclass) END,
               v_tx, u.account, u.asset, u.amount, v_effective, u.recorded_at, u.balance_after
          FROM unnest(l_account, l_asset, p_leg_amount, e_at, e_balance)
               WITH ORDINALITY AS u(account, asset, amount, recorded_at, balance_after, ord)
      )
      UPDATE ledger_balance b
         SET amount = k.amount, posting_count = b.posting_count + k.postings,
             updated_at = k.at
        FROM unnest(k_account, k_asset, k_amount, k_at, k_count)
             AS k(account, asset, amount, at, postings)
       WHERE b.account_id = k.account AND b.asset_id = k.asset;
      IF p_reverses[1] IS NOT NULL THEN
        PERFORM ledger_refuse_unnegated(ARRAY[v_tx]);
      END IF;
      RETURN QUERY SELECT v_tx, true;
      RETURN;
    END IF;
  END IF;

  -- A batch: set-based, a few statements whatever its size.
  -- 1. The ids, drawn here (in entry order, in leg order), so that the INSERTs need not
  -- return them: a transaction names its first leg's posting.
  e_tx := ARRAY(SELECT nextval('ledger_transaction_id_seq'::regclass)
                  FROM generate_series(1, v_entries));
  l_id := ARRAY(SELECT nextval('ledger_posting_id_seq'::regclass) FROM generate_series(1, n));

  -- The transactions, before any balance row: every poster takes its keys first (in
  -- key order) and its balance rows second (in (account, asset) order), so none holds
  -- a row while it waits for a key, and two batches never wait on each other's keys in
  -- a circle. One instant for the batch: the recorded time of its transactions and the
  -- effective time of those that give none.
  v_now := clock_timestamp();
  IF (SELECT max(e.at) FROM unnest(p_effective_at) AS e(at)) > v_now THEN
    SELECT e.at INTO v_effective FROM unnest(p_effective_at) AS e(at) WHERE e.at > v_now LIMIT 1;
    RAISE EXCEPTION USING ERRCODE = 'TL006',
      MESSAGE = format('effective time %s is in the future', v_effective);
  END IF;
  IF array_position(p_effective_at, NULL) IS NULL THEN
    e_effective := p_effective_at;
  ELSIF cardinality(array_remove(p_effective_at, NULL)) = 0 THEN  -- a batch dated now
    e_effective := array_fill(v_now, ARRAY[v_entries]);
    v_instants := ARRAY[v_now];
  ELSE
    e_effective := ARRAY(SELECT coalesce(e.at, v_now)
                           FROM unnest(p_effective_at) WITH ORDINALITY AS e(at, ord)
                          ORDER BY e.ord);
  END IF;
  -- A plain INSERT first: ON CONFLICT's speculative insertion cost 2.7 ms of a
  -- 1,000-entry batch (measured). A key posted before (a replay, the rare case) or given
  -- twice ends it with a unique violation, and the same INSERT with ON CONFLICT sorts it
  -- out. Either waits, like ON CONFLICT, for a concurrent poster of one of its keys.
  BEGIN
    INSERT INTO ledger_transaction AS t
           (id, idempotency_key, content_hash, description, effective_at, recorded_at,
            metadata, reverses_id, first_posting_id)
    SELECT e_tx[u.ord], u.key, u.hash, u.description, e_effective[u.ord], v_now,
           u.metadata::jsonb, u.reverses_id, l_id[e_first_leg[u.ord]]
      FROM (SELECT unnest(p_keys) AS key, unnest(p_hashes) AS hash,
                   unnest(p_descriptions) AS description, unnest(p_metadata) AS metadata,
                   unnest(p_reverses) AS reverses_id, generate_series(1, v_entries) AS ord) u
     ORDER BY u.key COLLATE "C";
    v_replayed := false;
  EXCEPTION WHEN unique_violation THEN
    WITH ins AS (
      INSERT INTO ledger_transaction AS t
             (id, idempotency_key, content_hash, description, effective_at, recorded_at,
              metadata, reverses_id, first_posting_id)
      SELECT e_tx[u.ord], u.key, u.hash, u.description, e_effective[u.ord], v_now,
             u.metadata::jsonb, u.reverses_id, l_id[e_first_leg[u.ord]]
        FROM unnest(p_keys, p_hashes, p_descriptions, p_metadata, p_reverses)
             WITH ORDINALITY AS u(key, hash, description, metadata, reverses_id, ord)
       ORDER BY u.key COLLATE "C"
      ON CONFLICT (idempotency_key) DO NOTHING
      RETURNING t.id
    )
    SELECT array_agg(ins.id) INTO v_created_id FROM ins;
    v_replayed := true;
  END;
  IF v_replayed THEN
    IF (SELECT count(DISTINCT k.key) FROM unnest(p_keys) AS k(key)) <> v_entries THEN
      RAISE EXCEPTION USING ERRCODE = '22023',
        MESSAGE = 'each entry of one call has its own idempotency key';
    END IF;
    -- Entries not created are replays: their transaction is the one with their key.
    e_tx := ARRAY(SELECT c.id
                    FROM unnest(e_tx) WITH ORDINALITY AS e(id, ord)
                    LEFT JOIN unnest(v_created_id) AS c(id) ON c.id = e.id
                   ORDER BY e.ord);
    SELECT k.key, t.id INTO bad
      FROM unnest(p_keys, p_hashes, e_tx) WITH ORDINALITY AS k(key, hash, tx, ord)
      LEFT JOIN ledger_transaction t ON t.idempotency_key = k.key
     WHERE k.tx IS NULL
       AND (t.id IS NULL OR t.content_hash IS DISTINCT FROM k.hash)
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
    IF v_created_id IS NULL THEN  -- every entry a replay
      RETURN QUERY
        SELECT t.id, false
          FROM unnest(p_keys) WITH ORDINALITY AS k(key, ord)
          JOIN ledger_transaction t ON t.idempotency_key = k.key
         ORDER BY k.ord;
      RETURN;
    END IF;
  END IF;

  -- 2. Per balance row (a distinct (account, asset) of the legs of the entries created
  -- here: a replay posts nothing): resolve the codes, total the legs, and see whether
  -- the row exists; rows in (account, asset) order, the order they are locked in. 100
  -- rows for a batch of 2,000 legs over 100 accounts: the legs are read three times in
  -- all (checked, here, inserted).
  SELECT array_agg(p.account ORDER BY p.account, p.asset),
         array_agg(p.asset ORDER BY p.account, p.asset),
         array_agg(p.account_code ORDER BY p.account, p.asset),
         array_agg(p.asset_code ORDER BY p.account, p.asset),
         array_agg(p.total ORDER BY p.account, p.asset),
         array_agg(p.postings ORDER BY p.account, p.asset),
         count(*) FILTER (WHERE p.account IS NULL OR p.asset IS NULL),
         count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM ledger_balance b
            WHERE b.account_id = p.account AND b.asset_id = p.asset))
    INTO k_account, k_asset, k_account_code, k_asset_code, k_total, k_count, v_unknown,
         v_missing
    FROM (SELECT (SELECT a.id FROM ledger_account a WHERE a.code = g.account_code) AS account,
                 (SELECT s.id FROM ledger_asset s WHERE s.code = g.asset_code) AS asset,
                 g.*
            FROM (SELECT u.account_code, u.asset_code, sum(u.amount) AS total,
                         count(*) AS postings
                    FROM (SELECT unnest(p_leg_entry) AS entry,
                                 unnest(p_leg_account) AS account_code,
                                 unnest(p_leg_asset) AS asset_code,
                                 unnest(p_leg_amount) AS amount) u
                   WHERE NOT v_replayed OR e_tx[u.entry] IS NOT NULL
                   GROUP BY u.account_code, u.asset_code) g) p;
  IF v_unknown > 0 THEN
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
    ELSIF bad.assets IS NULL THEN  -- opened by a concurrent writer since the lookup above
      RAISE EXCEPTION USING ERRCODE = '40001',
        MESSAGE = 'an account or asset of this batch was opened concurrently; post again';
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'TL012',
      DETAIL = json_build_object('assets', bad.assets[1:100]),
      MESSAGE = 'unknown assets: ' || array_to_string(bad.assets[1:10], ', ');
  END IF;
  -- After the INSERT, which holds the lock period_close waits for: every close
  -- committed before it is seen; one that is not has to wait for this commit.
  PERFORM ledger_refuse_closed(coalesce(v_instants,
    ARRAY(SELECT DISTINCT e.at FROM unnest(e_effective, e_tx) AS e(at, tx)
           WHERE e.tx IS NOT NULL)));

  -- 3. Lock the balance rows in (account, asset) order, as every poster does, so that
  -- posters wait for one another but never deadlock (missing ones are opened in that
  -- order first, see ledger_post_transfer).
  IF v_missing > 0 THEN
    PERFORM ledger_open_balances(k_account, k_asset);
  END IF;
  SELECT array_agg(b.amount), array_agg(b.updated_at) INTO k_amount, k_at
    FROM (SELECT b.amount, b.updated_at FROM ledger_balance b
           WHERE (b.account_id, b.asset_id) IN (SELECT * FROM unnest(k_account, k_asset))
           ORDER BY b.account_id, b.asset_id FOR UPDATE) b;
  IF cardinality(k_amount) IS DISTINCT FROM cardinality(k_account) THEN
    RAISE EXCEPTION 'ledger_post: % balance rows locked for % pairs',
      cardinality(k_amount), cardinality(k_account);
  END IF;

  -- 4. In one statement, the postings and the balance rows they move. Each leg finds
  -- its row (by code, among the rows above) and its place in the row's run (the
  -- running sum and count, in leg order); each posting is recorded one microsecond
  -- after its row's last one, and not before the batch's instant (so never before its
  -- effective time, and an entry dated now is not back-dated by the time the batch
  -- took to get here); its balance is the row's plus its run.
  WITH posted AS (
    INSERT INTO ledger_posting
           (id, transaction_id, account_id, asset_id, amount, effective_at, recorded_at,
            balance_after)
    SELECT l_id[r.ord], e_tx[r.entry], k_account[r.pair], k_asset[r.pair], r.amount,
           e_effective[r.entry],
           greatest(k_at[r.pair] + interval '1 microsecond', v_now)
             + (r.nth - 1) * interval '1 microsecond',
           k_amount[r.pair] + r.run
      FROM (SELECT l.entry, l.ord, l.amount, k.pair,
                   sum(l.amount) OVER w AS run, row_number() OVER w AS nth
              FROM (SELECT unnest(p_leg_entry) AS entry, unnest(p_leg_account) AS account_code,
                           unnest(p_leg_asset) AS asset_code, unnest(p_leg_amount) AS amount,
                           generate_series(1, n) AS ord) l
              JOIN unnest(k_account_code, k_asset_code) WITH ORDINALITY
                   AS k(account_code, asset_code, pair)
                ON k.account_code = l.account_code AND k.asset_code = l.asset_code
             WHERE NOT v_replayed OR e_tx[l.entry] IS NOT NULL
            WINDOW w AS (PARTITION BY k.pair ORDER BY l.ord)) r
  )
  UPDATE ledger_balance b
     SET amount = b.amount + g.total, posting_count = b.posting_count + g.postings,
         updated_at = greatest(b.updated_at + interval '1 microsecond', v_now)
                        + (g.postings - 1) * interval '1 microsecond'
    FROM unnest(k_account, k_asset, k_total, k_count) AS g(account, asset, total, postings)
   WHERE b.account_id = g.account AND b.asset_id = g.asset;
  IF cardinality(array_remove(p_reverses, NULL)) > 0 THEN
    PERFORM ledger_refuse_unnegated(ARRAY(
      SELECT e.tx FROM unnest(e_tx, p_reverses) AS e(tx, reverses)
       WHERE e.reverses IS NOT NULL AND e.tx IS NOT NULL));
  END IF;

  IF NOT v_replayed THEN
    RETURN QUERY SELECT e.tx, true FROM unnest(e_tx) AS e(tx);
  ELSE
    RETURN QUERY
      SELECT t.id, e_tx[k.ord] IS NOT NULL
        FROM unnest(p_keys) WITH ORDINALITY AS k(key, ord)
        JOIN ledger_transaction t ON t.idempotency_key = k.key
       ORDER BY k.ord;
  END IF;
END $$;
"""


def replace_poster(apps, schema_editor, post_sql=POST_SQL):
    """Create ledger_post() from `post_sql` (0008's, or 0010's patch of it)."""
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_schema(), pg_get_serial_sequence('ledger_transaction', 'id')"
        )
        schema, transaction_ids = cursor.fetchone()
    sql = trusted_poster.qualified(post_sql, schema)
    sql = sql.replace("'ledger_transaction_id_seq'", "'" + transaction_ids.replace("'", "''") + "'")
    # ledger_post() draws the transactions' ids itself now (see above).
    schema_editor.execute(f"GRANT USAGE ON SEQUENCE {transaction_ids} TO ledger_poster")
    schema_editor.execute(sql, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0007_batch_instant"),
    ]

    operations = [
        migrations.RunPython(replace_poster),
    ]
