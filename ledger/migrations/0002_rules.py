"""The rules of the books, enforced by PostgreSQL so that no code path can break them.

Every rule raises its own SQLSTATE (class TL), so callers and tests can tell which
rule fired (ledger/exceptions.py maps them):

  TL001  a transaction does not balance per asset, or has fewer than two postings
  TL002  posted rows are append-only (UPDATE, DELETE, TRUNCATE refused)
  TL003  the effective time falls in a closed period
  TL004  postings added to a transaction committed earlier
  TL005  balances are written only by the posting trigger
  TL006  effective time in the future
  TL007  a closed period cannot be reopened or moved; asset and account codes are fixed
  TL008  a reversal does not negate the transaction it reverses

Balancing is one deferred constraint trigger per *transaction* row, which sums that
transaction's postings once at commit (linear in legs; django-hordak's per-posting
trigger re-sums the transaction for every leg, which is quadratic).
"""

from django.db import migrations

BACKDATED_LAG = "interval '1 second'"

RULES_SQL = f"""
-- TL002: append-only tables.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'TL002',
    MESSAGE = format('%s is append-only: %s refused', TG_TABLE_NAME, TG_OP);
END $$;

CREATE TRIGGER ledger_transaction_immutable BEFORE UPDATE OR DELETE ON ledger_transaction
  FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_transaction_no_truncate BEFORE TRUNCATE ON ledger_transaction
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_posting_immutable BEFORE UPDATE OR DELETE ON ledger_posting
  FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_posting_no_truncate BEFORE TRUNCATE ON ledger_posting
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- TL003, TL006: stamp a new transaction; refuse closed periods and future dates.
CREATE FUNCTION ledger_transaction_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  closed record;
BEGIN
  NEW.created_xact := pg_current_xact_id()::text::bigint;
  NEW.recorded_at := clock_timestamp();
  IF NEW.effective_at IS NULL THEN
    NEW.effective_at := now();
  END IF;
  IF NEW.effective_at > NEW.recorded_at THEN
    RAISE EXCEPTION USING ERRCODE = 'TL006',
      MESSAGE = format('effective time %s is in the future', NEW.effective_at);
  END IF;
  -- Under READ COMMITTED each statement here sees committed closes; a stricter
  -- isolation level reads an older snapshot, so it locks the period row instead,
  -- which fails with a serialization error if the period was closed meanwhile.
  IF current_setting('transaction_isolation') = 'read committed' THEN
    SELECT id, starts_at, ends_at INTO closed FROM ledger_period
     WHERE status = 'closed' AND starts_at <= NEW.effective_at AND NEW.effective_at < ends_at;
  ELSE
    SELECT id, starts_at, ends_at INTO closed FROM ledger_period
     WHERE status = 'closed' AND starts_at <= NEW.effective_at AND NEW.effective_at < ends_at
       FOR SHARE;
  END IF;
  IF FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'TL003',
      MESSAGE = format('effective time %s falls in the closed period %s to %s',
                       NEW.effective_at, closed.starts_at, closed.ends_at);
  END IF;
  RETURN NEW;
END $$;

CREATE TRIGGER ledger_transaction_stamp BEFORE INSERT ON ledger_transaction
  FOR EACH ROW EXECUTE FUNCTION ledger_transaction_before_insert();

-- TL004, TL005: each posting joins a transaction of this database transaction and
-- moves its balance; recorded_at and balance_after are taken under the balance
-- row's lock, so recorded_at is strictly increasing per (account, asset) and
-- balance_after is the running balance in that order (ledger/selectors.py).
CREATE FUNCTION ledger_posting_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  tx_effective_at timestamptz;
BEGIN
  SELECT effective_at INTO tx_effective_at FROM ledger_transaction
   WHERE id = NEW.transaction_id AND created_xact = pg_current_xact_id()::text::bigint;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'TL004',
      MESSAGE = format('transaction %s was committed earlier; postings cannot be added to it',
                       NEW.transaction_id);
  END IF;
  NEW.effective_at := tx_effective_at;
  UPDATE ledger_balance
     SET amount = amount + NEW.amount,
         posting_count = posting_count + 1,
         updated_at = greatest(updated_at + interval '1 microsecond', clock_timestamp())
   WHERE account_id = NEW.account_id AND asset_id = NEW.asset_id
  RETURNING amount, updated_at INTO NEW.balance_after, NEW.recorded_at;
  IF NOT FOUND THEN
    INSERT INTO ledger_balance AS b (account_id, asset_id, amount, posting_count, updated_at)
    VALUES (NEW.account_id, NEW.asset_id, NEW.amount, 1, clock_timestamp())
    ON CONFLICT (account_id, asset_id) DO UPDATE
       SET amount = b.amount + EXCLUDED.amount,
           posting_count = b.posting_count + 1,
           updated_at = greatest(b.updated_at + interval '1 microsecond', clock_timestamp())
    RETURNING amount, updated_at INTO NEW.balance_after, NEW.recorded_at;
  END IF;
  RETURN NEW;
END $$;

CREATE TRIGGER ledger_posting_apply BEFORE INSERT ON ledger_posting
  FOR EACH ROW EXECUTE FUNCTION ledger_posting_before_insert();

CREATE FUNCTION ledger_balance_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF pg_trigger_depth() < 2 THEN
    RAISE EXCEPTION USING ERRCODE = 'TL005',
      MESSAGE = 'ledger_balance is maintained by postings only: ' || TG_OP || ' refused';
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END $$;

CREATE TRIGGER ledger_balance_guard BEFORE INSERT OR UPDATE OR DELETE ON ledger_balance
  FOR EACH ROW EXECUTE FUNCTION ledger_balance_guard();
CREATE TRIGGER ledger_balance_no_truncate BEFORE TRUNCATE ON ledger_balance
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_balance_guard();

-- TL001, TL008: at commit, each new transaction balances per asset and has two legs or
-- more; a reversal nets to zero with its original, account by account.
CREATE FUNCTION ledger_transaction_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  legs bigint;
  unbalanced_asset bigint;
  unbalanced_total numeric;
BEGIN
  -- One grouped read of the transaction's legs; the asset's code only for the message.
  SELECT coalesce(sum(g.n), 0), min(g.asset_id) FILTER (WHERE g.total <> 0)
    INTO legs, unbalanced_asset
    FROM (SELECT asset_id, count(*) AS n, sum(amount) AS total FROM ledger_posting
           WHERE transaction_id = NEW.id GROUP BY asset_id) g;
  IF legs < 2 THEN
    RAISE EXCEPTION USING ERRCODE = 'TL001',
      MESSAGE = format('transaction %s (%s) has %s postings; at least 2 are required',
                       NEW.id, NEW.idempotency_key, legs);
  END IF;
  IF unbalanced_asset IS NOT NULL THEN
    SELECT sum(amount) INTO unbalanced_total FROM ledger_posting
     WHERE transaction_id = NEW.id AND asset_id = unbalanced_asset;
    RAISE EXCEPTION USING ERRCODE = 'TL001',
      MESSAGE = format('transaction %s (%s) does not balance: asset %s sums to %s',
                       NEW.id, NEW.idempotency_key,
                       (SELECT code FROM ledger_asset WHERE id = unbalanced_asset),
                       unbalanced_total);
  END IF;
  IF NEW.reverses_id IS NOT NULL THEN
    PERFORM 1 FROM ledger_posting
     WHERE transaction_id IN (NEW.id, NEW.reverses_id)
     GROUP BY account_id, asset_id HAVING sum(amount) <> 0
     LIMIT 1;
    IF FOUND THEN
      RAISE EXCEPTION USING ERRCODE = 'TL008',
        MESSAGE = format('transaction %s (%s) reverses %s but does not negate it',
                         NEW.id, NEW.idempotency_key, NEW.reverses_id);
    END IF;
  END IF;
  RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_transaction_balanced AFTER INSERT ON ledger_transaction
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION ledger_transaction_check_balanced();

-- TL007: what postings refer to does not change meaning underneath them.
CREATE FUNCTION ledger_asset_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.code <> OLD.code OR NEW.scale <> OLD.scale THEN
    RAISE EXCEPTION USING ERRCODE = 'TL007', MESSAGE = 'an asset''s code and scale are fixed';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER ledger_asset_fixed BEFORE UPDATE ON ledger_asset
  FOR EACH ROW EXECUTE FUNCTION ledger_asset_fixed();

CREATE FUNCTION ledger_account_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.code <> OLD.code OR NEW.kind <> OLD.kind THEN
    RAISE EXCEPTION USING ERRCODE = 'TL007', MESSAGE = 'an account''s code and kind are fixed';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER ledger_account_fixed BEFORE UPDATE ON ledger_account
  FOR EACH ROW EXECUTE FUNCTION ledger_account_fixed();

CREATE FUNCTION ledger_period_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NEW.status = 'closed' THEN  -- closing is an act (period_close), not a starting state
      RAISE EXCEPTION USING ERRCODE = 'TL007', MESSAGE = 'a period is opened, then closed';
    END IF;
    RETURN NEW;
  END IF;
  IF OLD.status = 'closed' THEN
    RAISE EXCEPTION USING ERRCODE = 'TL007', MESSAGE = 'a closed period cannot be changed';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER ledger_period_fixed BEFORE INSERT OR UPDATE ON ledger_period
  FOR EACH ROW EXECUTE FUNCTION ledger_period_fixed();

CREATE FUNCTION ledger_period_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.status = 'closed' THEN
    RAISE EXCEPTION USING ERRCODE = 'TL007', MESSAGE = 'a closed period cannot be deleted';
  END IF;
  RETURN OLD;
END $$;
CREATE TRIGGER ledger_period_no_delete BEFORE DELETE ON ledger_period
  FOR EACH ROW EXECUTE FUNCTION ledger_period_refuse_delete();

-- Point-in-time balances (ledger/selectors.py): postings recorded well after their
-- effective time are few (adjustments dated back into an open period); this covering
-- index answers them with an index-only scan, without touching the account's history.
CREATE INDEX ledger_posting_backdated_idx
    ON ledger_posting (account_id, asset_id, effective_at) INCLUDE (recorded_at, amount)
 WHERE recorded_at - effective_at > {BACKDATED_LAG};
"""

REVERSE_SQL = """
DROP INDEX IF EXISTS ledger_posting_backdated_idx;
DROP TRIGGER IF EXISTS ledger_period_no_delete ON ledger_period;
DROP FUNCTION IF EXISTS ledger_period_refuse_delete();
DROP TRIGGER IF EXISTS ledger_period_fixed ON ledger_period;
DROP FUNCTION IF EXISTS ledger_period_fixed();
DROP TRIGGER IF EXISTS ledger_account_fixed ON ledger_account;
DROP FUNCTION IF EXISTS ledger_account_fixed();
DROP TRIGGER IF EXISTS ledger_asset_fixed ON ledger_asset;
DROP FUNCTION IF EXISTS ledger_asset_fixed();
DROP TRIGGER IF EXISTS ledger_transaction_balanced ON ledger_transaction;
DROP FUNCTION IF EXISTS ledger_transaction_check_balanced();
DROP TRIGGER IF EXISTS ledger_balance_no_truncate ON ledger_balance;
DROP TRIGGER IF EXISTS ledger_balance_guard ON ledger_balance;
DROP FUNCTION IF EXISTS ledger_balance_guard();
DROP TRIGGER IF EXISTS ledger_posting_apply ON ledger_posting;
DROP FUNCTION IF EXISTS ledger_posting_before_insert();
DROP TRIGGER IF EXISTS ledger_transaction_stamp ON ledger_transaction;
DROP FUNCTION IF EXISTS ledger_transaction_before_insert();
DROP TRIGGER IF EXISTS ledger_posting_no_truncate ON ledger_posting;
DROP TRIGGER IF EXISTS ledger_posting_immutable ON ledger_posting;
DROP TRIGGER IF EXISTS ledger_transaction_no_truncate ON ledger_transaction;
DROP TRIGGER IF EXISTS ledger_transaction_immutable ON ledger_transaction;
DROP FUNCTION IF EXISTS ledger_refuse_change();
"""


class Migration(migrations.Migration):
    dependencies = [("ledger", "0001_initial")]

    operations = [migrations.RunSQL(RULES_SQL, REVERSE_SQL)]
