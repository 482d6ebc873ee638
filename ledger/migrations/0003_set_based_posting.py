"""Posting, set-based: one call for a whole batch, each rule checked once per statement.

Migration 0002 kept the books with row-level triggers: a balance UPDATE per leg, a
deferred balancing check and a period lookup per transaction, and PostgreSQL's own
foreign-key checks, three per leg, at commit. Measured with `bench ledger`, those
per-row steps were most of the cost of posting (about 50 microseconds per leg).
Here one statement-level trigger on postings checks every rule over the statement's
rows (a transition table) and moves the balances, and `ledger_post()` writes a batch
in four statements whatever its size:

  ledger_post(entries..., legs...)   resolve codes and lock the balance rows in
                                     (account, asset) order; insert the transactions
                                     ON CONFLICT DO NOTHING; insert the postings with
                                     recorded_at and balance_after computed under the
                                     locks; return the ids.

What the database enforces, whoever writes (same SQLSTATEs as 0002, plus TL009-TL012):

  TL001  each statement's postings balance per (transaction, asset), so a transaction
         balances at commit; a transaction has postings: its first_posting_id is a
         deferred foreign key to one of its own postings (a non-zero leg that
         balances needs a second one)
  TL003  no transaction dated in a closed period;  TL006  none dated in the future
  TL004  postings join only a transaction created in the same database transaction,
         with its effective time; created_xact and recorded_at are the database's
         (these are checked with the transaction's postings: it has some, by the
         first-posting foreign key, so one statement trigger on postings checks all)
  TL005  balances are written only by the posting trigger (a zero row may be opened)
  TL007  accounts and assets are never deleted (postings refer to them by id)
  TL008  a reversal negates its original, account by account
  TL009  recorded_at strictly increases per (account, asset) from the stored balance's
         last posting, and balance_after is the running balance in that order
  TL010  an idempotency key posted again with different content (ledger_post)
  TL011  an unknown account code, TL012 an unknown asset code (ledger_post)

Irreversible: 0002's row-level rules are not restored by migrating back.
"""

import django.db.models.deletion
import ledger.models
from django.db import migrations, models


BACKDATED_LAG = "interval '10 milliseconds'"  # ledger/selectors.py has the same

RULES_SQL = r"""
-- The row-level machinery of 0002 that the statement-level rules below replace.
DROP TRIGGER ledger_transaction_stamp ON ledger_transaction;
DROP FUNCTION ledger_transaction_before_insert();
DROP TRIGGER ledger_posting_apply ON ledger_posting;
DROP FUNCTION ledger_posting_before_insert();
DROP TRIGGER ledger_transaction_balanced ON ledger_transaction;
DROP FUNCTION ledger_transaction_check_balanced();
DROP TRIGGER ledger_balance_guard ON ledger_balance;
DROP TRIGGER ledger_balance_no_truncate ON ledger_balance;
DROP FUNCTION ledger_balance_guard();

-- TL001 (no entry without lines): each transaction names its first posting, and a
-- deferred foreign key requires that posting, of this very transaction, at commit.
ALTER TABLE ledger_transaction ADD COLUMN first_posting_id bigint;
ALTER TABLE ledger_transaction DISABLE TRIGGER ledger_transaction_immutable;
UPDATE ledger_transaction t
   SET first_posting_id = (SELECT min(p.id) FROM ledger_posting p WHERE p.transaction_id = t.id);
ALTER TABLE ledger_transaction ENABLE TRIGGER ledger_transaction_immutable;
ALTER TABLE ledger_transaction ALTER first_posting_id SET NOT NULL;
ALTER TABLE ledger_transaction ADD CONSTRAINT ledger_transaction_first_posting_fk
  FOREIGN KEY (id, first_posting_id) REFERENCES ledger_posting (transaction_id, id)
  DEFERRABLE INITIALLY DEFERRED;

-- Point-in-time balances (ledger/selectors.py) need the postings recorded after an
-- instant T but effective by T. Those recorded within BACKDATED_LAG of T are a range of
-- the recorded index; the rest, back-dated by more, are indexed here by lag class: a
-- posting of class k was recorded less than 10 ms x 2^k after its effective time, so
-- if it straddles T it was recorded before T + 10 ms x 2^k. One range probe per class
-- reads about twice the postings that straddle T, whatever the size of the history.
-- ledger_post records an entry posted "now" within microseconds of its effective
-- time, so only real back-dating lands in this index.
CREATE FUNCTION ledger_lag_class(lag interval) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN width_bucket(extract(epoch FROM lag), ARRAY[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84, 327.68, 655.36, 1310.72, 2621.44, 5242.88, 10485.76, 20971.52, 41943.04, 83886.08, 167772.16, 335544.32, 671088.64, 1342177.28, 2684354.56, 5368709.12, 10737418.24, 21474836.48, 42949672.96, 85899345.92, 171798691.84, 343597383.68, 687194767.36, 1374389534.72, 2748779069.44, 5497558138.88, 10995116277.76]::numeric[]);

DROP INDEX ledger_posting_backdated_idx;
CREATE INDEX ledger_posting_backdated_idx
    ON ledger_posting (account_id, asset_id, ledger_lag_class(recorded_at - effective_at),
                       recorded_at)
       INCLUDE (effective_at, amount)
 WHERE recorded_at - effective_at > {lag};

-- TL007: postings refer to accounts and assets by id, without per-row foreign keys.
CREATE FUNCTION ledger_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'TL007',
    MESSAGE = format('%s rows are never deleted: %s refused', TG_TABLE_NAME, TG_OP);
END $$;
CREATE TRIGGER ledger_account_no_delete BEFORE DELETE ON ledger_account
  FOR EACH ROW EXECUTE FUNCTION ledger_refuse_delete();
CREATE TRIGGER ledger_account_no_truncate BEFORE TRUNCATE ON ledger_account
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_delete();
CREATE TRIGGER ledger_asset_no_delete BEFORE DELETE ON ledger_asset
  FOR EACH ROW EXECUTE FUNCTION ledger_refuse_delete();
CREATE TRIGGER ledger_asset_no_truncate BEFORE TRUNCATE ON ledger_asset
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_delete();

-- TL005: balances move only from the posting trigger (trigger depth 2 and deeper); a
-- zero balance row may be opened by anyone (ledger_post opens them before locking).
CREATE FUNCTION ledger_balance_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF pg_trigger_depth() < 2 THEN
    RAISE EXCEPTION USING ERRCODE = 'TL005',
      MESSAGE = 'ledger_balance is maintained by postings only: ' || TG_OP || ' refused';
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER ledger_balance_guard BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_balance
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_balance_guard();

CREATE FUNCTION ledger_balance_opened() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF pg_trigger_depth() < 2 AND EXISTS (
       SELECT 1 FROM new_rows
        WHERE amount <> 0 OR posting_count <> 0 OR updated_at <> '-infinity') THEN
    RAISE EXCEPTION USING ERRCODE = 'TL005',
      MESSAGE = 'ledger_balance is maintained by postings only: INSERT refused '
                '(a balance row opens at zero)';
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER ledger_balance_opened AFTER INSERT ON ledger_balance
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_balance_opened();

-- Every rule over each INSERT's new postings and their transactions, then the balances
-- move: one statement finds the first broken rule and, if none is, applies the
-- statement's totals to the balance rows. A transaction is checked with its postings
-- (it has some: the first-posting foreign key), so no trigger on transactions is needed.
-- Plans are generic: made once per session (the parameters are arrays of any length).
CREATE FUNCTION ledger_postings_inserted() RETURNS trigger LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off AS $$
DECLARE
  kept boolean;
  bad record;
  drifted bigint;
  missing bigint;
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
  -- One pass over the statement's postings with their transactions and their balance
  -- rows (locked before they are read; ledger_post holds the locks already): are all
  -- rules kept? Reversals, and entries near a closed period, take the exact path below.
  SELECT c.ok AND NOT EXISTS (SELECT 1 FROM ledger_period p
                               WHERE p.status = 'closed' AND p.starts_at <= c.latest
                                 AND c.earliest < p.ends_at)
    INTO kept
    FROM (SELECT coalesce(bool_and(coalesce(
                   y.tx_id IS NOT NULL AND y.reverses_id IS NULL
                   AND y.created_xact = pg_current_xact_id()::text::bigint
                   AND y.effective_at = y.tx_effective_at
                   AND y.tx_effective_at <= y.tx_recorded_at
                   AND y.tx_recorded_at >= transaction_timestamp()
                   AND y.tx_recorded_at <= clock_timestamp()
                   AND y.tx_asset_total = 0
                   AND y.balance_after = y.expected AND y.recorded_at > y.previous_at
                   AND y.effective_at <= y.recorded_at
                   AND y.recorded_at <= clock_timestamp() + interval '1 second', false)), true)
                   AS ok,
                 min(y.tx_effective_at) AS earliest, max(y.tx_effective_at) AS latest
            FROM (SELECT x.*,
                         sum(x.amount) OVER (PARTITION BY x.transaction_id, x.asset_id)
                           AS tx_asset_total,
                         coalesce(x.opening, 0) + sum(x.amount) OVER w AS expected,
                         coalesce(lag(x.recorded_at) OVER w, x.opened_at, '-infinity')
                           AS previous_at
                    FROM (SELECT n.id, n.transaction_id, n.account_id, n.asset_id, n.amount,
                                 n.effective_at, n.recorded_at, n.balance_after,
                                 t.id AS tx_id, t.created_xact, t.reverses_id,
                                 t.effective_at AS tx_effective_at,
                                 t.recorded_at AS tx_recorded_at,
                                 b.amount AS opening, b.updated_at AS opened_at
                            FROM new_rows n
                            LEFT JOIN ledger_transaction t ON t.id = n.transaction_id
                            LEFT JOIN (SELECT b.account_id, b.asset_id, b.amount, b.updated_at
                                         FROM ledger_balance b
                                        WHERE (b.account_id, b.asset_id)
                                              IN (SELECT n.account_id, n.asset_id
                                                    FROM new_rows n)
                                        ORDER BY b.account_id, b.asset_id
                                          FOR UPDATE) b
                              ON b.account_id = n.account_id AND b.asset_id = n.asset_id) x
                  WINDOW w AS (PARTITION BY x.account_id, x.asset_id
                               ORDER BY x.recorded_at, x.id)) y) c;

  IF NOT kept THEN
    -- The exact path: which rule, with a message that names the row.
    WITH j AS MATERIALIZED (
      SELECT n.id, n.transaction_id, n.account_id, n.asset_id, n.amount, n.effective_at,
             n.recorded_at, n.balance_after, t.id AS tx_id, t.idempotency_key,
             t.created_xact, t.effective_at AS tx_effective_at,
             t.recorded_at AS tx_recorded_at, t.reverses_id
        FROM new_rows n LEFT JOIN ledger_transaction t ON t.id = n.transaction_id
    ), b AS MATERIALIZED (
      SELECT b.account_id, b.asset_id, b.amount, b.updated_at
        FROM ledger_balance b
       WHERE (b.account_id, b.asset_id) IN (SELECT n.account_id, n.asset_id FROM new_rows n)
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
  END IF;

  -- The balances move. ledger_post opened every row it needed before locking; a writer
  -- that did not gets its missing rows opened here.
  WITH g AS (
    SELECT n.account_id, n.asset_id, sum(n.amount) AS total, count(*) AS postings,
           max(n.recorded_at) AS last_at,
           (array_agg(n.balance_after ORDER BY n.recorded_at DESC))[1] AS closing
      FROM new_rows n GROUP BY n.account_id, n.asset_id
  ), moved AS (
    UPDATE ledger_balance m
       SET amount = m.amount + g.total, posting_count = m.posting_count + g.postings,
           updated_at = g.last_at
      FROM g
     WHERE m.account_id = g.account_id AND m.asset_id = g.asset_id
    RETURNING m.account_id, m.asset_id, m.amount
  )
  SELECT count(*) FILTER (WHERE moved.amount <> g.closing),
         count(*) - count(moved.account_id)
    INTO drifted, missing
    FROM g LEFT JOIN moved ON g.account_id = moved.account_id AND g.asset_id = moved.asset_id;
  IF missing > 0 THEN
    WITH g AS (
      SELECT n.account_id, n.asset_id, sum(n.amount) AS total, count(*) AS postings,
             max(n.recorded_at) AS last_at
        FROM new_rows n GROUP BY n.account_id, n.asset_id
    )
    INSERT INTO ledger_balance (account_id, asset_id, amount, posting_count, updated_at)
    SELECT g.account_id, g.asset_id, g.total, g.postings, g.last_at
      FROM g
     WHERE NOT EXISTS (SELECT 1 FROM ledger_balance b
                        WHERE b.account_id = g.account_id AND b.asset_id = g.asset_id)
     ORDER BY g.account_id, g.asset_id;
  END IF;
  IF drifted > 0 THEN
    -- Only a writer that did not lock first can get here: another one opened the same
    -- balance between our read and our write. Nothing is written; posting again works.
    RAISE EXCEPTION USING ERRCODE = '40001',
      MESSAGE = 'a balance was opened by a concurrent posting; post again';
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER ledger_postings_inserted AFTER INSERT ON ledger_posting
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_postings_inserted();

-- The one way in. Entries are parallel arrays; legs name their entry by its 1-based
-- position. Returns one row per entry, in order: its transaction id and whether this
-- call created it (an idempotency key posted before with the same content hash is
-- answered with the stored transaction).
-- Its plans are generic too, and probe indexes only: its statements touch a few rows of
-- tables that grow without bound, and balance rows carry many dead versions between
-- vacuums, so a sequential scan chosen while a table is small costs more every post.
-- No JIT: compiling a plan costs milliseconds, running one of these microseconds.
CREATE FUNCTION ledger_post(
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
BEGIN
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
        ('ledger', '0002_rules'),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name='posting',
            name='ledger_posting_tx_idx',
        ),
        migrations.RemoveIndex(
            model_name='posting',
            name='ledger_posting_recorded_idx',
        ),
        migrations.AlterField(
            model_name='posting',
            name='account',
            field=models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='postings', to='ledger.account'),
        ),
        migrations.AlterField(
            model_name='posting',
            name='asset',
            field=models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='postings', to='ledger.asset'),
        ),
        migrations.AlterField(
            model_name='posting',
            name='transaction',
            field=models.ForeignKey(db_constraint=False, db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='postings', to='ledger.transaction'),
        ),
        migrations.AlterField(
            model_name='transaction',
            name='created_xact',
            field=models.BigIntegerField(db_default=ledger.models.CurrentXactId(), editable=False),
        ),
        migrations.AlterField(
            model_name='transaction',
            name='idempotency_key',
            field=models.CharField(db_collation='C', max_length=200),
        ),
        migrations.AddConstraint(
            model_name='posting',
            constraint=models.UniqueConstraint(fields=('transaction', 'id'), name='ledger_posting_transaction_line_unique', violation_error_code='posting_transaction_line_unique'),
        ),
        migrations.AddConstraint(
            model_name='posting',
            constraint=models.UniqueConstraint(fields=('account', 'asset', 'recorded_at'), include=('balance_after',), name='ledger_posting_recorded_unique', violation_error_code='posting_recorded_unique'),
        ),
        migrations.AddConstraint(
            model_name='transaction',
            constraint=models.UniqueConstraint(fields=('idempotency_key',), name='ledger_transaction_idempotency_key_unique', violation_error_code='transaction_idempotency_key_unique'),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddField(
                    model_name='transaction',
                    name='first_posting_id',
                    field=models.BigIntegerField(editable=False),
                ),
            ],
        ),
        # Irreversible: 0002's row-level rules are not restored.
        migrations.RunSQL(RULES_SQL.replace("{lag}", BACKDATED_LAG)),
    ]
