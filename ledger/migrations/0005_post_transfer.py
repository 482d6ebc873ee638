"""ledger_post_transfer(): one two-leg entry with scalar parameters.

The most common call (an API request, a task, the bench's one-by-one transfers) is one
entry of two legs in one asset between two accounts. Measured from Python with the
trigger of 0004 in place: this function with scalar parameters posted 908-980
transfers/s where ledger_post() with ten one-element arrays posted 563/s. Dumping and
parsing the arrays, its set statements and RETURN QUERY made the difference. The rules
are the trigger's, as for every writer, and the ids, instants, running balances,
idempotency answers and errors are the same as ledger_post()'s.
"""

from django.db import migrations

POST_TRANSFER_SQL = r"""
CREATE FUNCTION ledger_post_transfer(
  p_key text, p_hash text, p_description text, p_effective_at timestamptz, p_metadata text,
  p_account_1 text, p_account_2 text, p_asset text, p_amount_1 numeric,
  OUT transaction_id bigint, OUT created boolean
)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
  v_account_1 bigint;
  v_account_2 bigint;
  v_asset bigint;
  v_amount_1 numeric;
  v_amount_2 numeric;
  v_at_1 timestamptz;
  v_at_2 timestamptz;
  v_now timestamptz;
  v_first bigint;
  v_effective timestamptz;
  v_hash text;
BEGIN
  v_account_1 := (SELECT a.id FROM ledger_account a WHERE a.code = p_account_1);
  v_account_2 := (SELECT a.id FROM ledger_account a WHERE a.code = p_account_2);
  v_asset := (SELECT s.id FROM ledger_asset s WHERE s.code = p_asset);
  IF v_account_1 IS NULL OR v_account_2 IS NULL OR v_asset IS NULL THEN
    -- ledger_post() names unknown codes (TL011, TL012), sorted, with their DETAIL.
    PERFORM ledger_post(ARRAY[p_key], ARRAY[p_hash], ARRAY[p_description],
                        ARRAY[p_effective_at], ARRAY[p_metadata], ARRAY[NULL::bigint],
                        ARRAY[1, 1], ARRAY[p_account_1, p_account_2], ARRAY[p_asset, p_asset],
                        ARRAY[p_amount_1, -p_amount_1]);
  ELSIF v_account_1 = v_account_2 THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'ledger_post_transfer moves between two accounts; use ledger_post';
  END IF;

  -- Lock the two balance rows in (account, asset) order, as every poster does; a
  -- missing one is opened at zero first.
  FOR attempt IN 1..2 LOOP
    IF v_account_1 < v_account_2 THEN
      SELECT b.amount, b.updated_at INTO v_amount_1, v_at_1 FROM ledger_balance b
       WHERE b.account_id = v_account_1 AND b.asset_id = v_asset FOR UPDATE;
      SELECT b.amount, b.updated_at INTO v_amount_2, v_at_2 FROM ledger_balance b
       WHERE b.account_id = v_account_2 AND b.asset_id = v_asset FOR UPDATE;
    ELSE
      SELECT b.amount, b.updated_at INTO v_amount_2, v_at_2 FROM ledger_balance b
       WHERE b.account_id = v_account_2 AND b.asset_id = v_asset FOR UPDATE;
      SELECT b.amount, b.updated_at INTO v_amount_1, v_at_1 FROM ledger_balance b
       WHERE b.account_id = v_account_1 AND b.asset_id = v_asset FOR UPDATE;
    END IF;
    EXIT WHEN v_amount_1 IS NOT NULL AND v_amount_2 IS NOT NULL;
    INSERT INTO ledger_balance (account_id, asset_id, amount, posting_count, updated_at)
    SELECT u.account, v_asset, 0, 0, '-infinity'::timestamptz
      FROM unnest(ARRAY[v_account_1, v_account_2]) AS u(account)
     ORDER BY 1
    ON CONFLICT (account_id, asset_id) DO NOTHING;
  END LOOP;

  -- Under the locks, one instant, as in ledger_post().
  v_now := clock_timestamp();
  v_first := nextval('ledger_posting_id_seq'::regclass);
  INSERT INTO ledger_transaction AS t
         (idempotency_key, content_hash, description, effective_at, recorded_at, metadata,
          reverses_id, first_posting_id)
  VALUES (p_key, p_hash, p_description, coalesce(p_effective_at, v_now), v_now,
          p_metadata::jsonb, NULL, v_first)
  ON CONFLICT (idempotency_key) DO NOTHING
  RETURNING t.id, t.effective_at INTO transaction_id, v_effective;
  IF transaction_id IS NULL THEN
    SELECT t.id, t.content_hash INTO transaction_id, v_hash
      FROM ledger_transaction t WHERE t.idempotency_key = p_key;
    IF transaction_id IS NULL THEN  -- its poster rolled back after we waited for it
      RAISE EXCEPTION USING ERRCODE = '40001',
        MESSAGE = format('transaction %s was being posted concurrently; post again', p_key);
    ELSIF v_hash <> p_hash THEN
      RAISE EXCEPTION USING ERRCODE = 'TL010',
        DETAIL = json_build_object('idempotency_key', p_key, 'transaction_id', transaction_id),
        MESSAGE = format('idempotency key %s was already posted with different content',
                         p_key);
    END IF;
    created := false;
    RETURN;
  END IF;
  INSERT INTO ledger_posting
         (id, transaction_id, account_id, asset_id, amount, effective_at, recorded_at,
          balance_after)
  VALUES (v_first, transaction_id, v_account_1, v_asset, p_amount_1, v_effective,
          greatest(v_at_1 + interval '1 microsecond', v_now), v_amount_1 + p_amount_1),
         (nextval('ledger_posting_id_seq'::regclass), transaction_id, v_account_2, v_asset,
          -p_amount_1, v_effective, greatest(v_at_2 + interval '1 microsecond', v_now),
          v_amount_2 - p_amount_1);
  created := true;
END $$;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0004_lean_posting"),
    ]

    operations = [
        migrations.RunSQL(POST_TRANSFER_SQL, "DROP FUNCTION ledger_post_transfer"),
    ]
