"""Recompute the books from their postings and report every discrepancy.

Independent of the triggers that keep the books right: it re-derives each fact with
plain SQL over all postings, so a bug in a trigger (or a disabled one) shows up here.
"""

from __future__ import annotations

from django.db import connection

DISCREPANCIES_PER_CHECK_MAX = 100

CHECKS: tuple[tuple[str, str], ...] = (
    (
        "stored balance differs from the sum of postings",
        """
        SELECT format('account %%s asset %%s: stored %%s (%%s postings), postings sum to %%s (%%s)',
                      a.code, s.code, coalesce(b.amount, 0), coalesce(b.posting_count, 0),
                      coalesce(p.total, 0), coalesce(p.n, 0))
          FROM ledger_balance b
          FULL JOIN (SELECT account_id, asset_id, sum(amount) AS total, count(*) AS n
                       FROM ledger_posting GROUP BY account_id, asset_id) p
            ON p.account_id = b.account_id AND p.asset_id = b.asset_id
          JOIN ledger_account a ON a.id = coalesce(b.account_id, p.account_id)
          JOIN ledger_asset s ON s.id = coalesce(b.asset_id, p.asset_id)
         WHERE coalesce(b.amount, 0) <> coalesce(p.total, 0)
            OR coalesce(b.posting_count, 0) <> coalesce(p.n, 0)
         LIMIT %(limit)s
        """,
    ),
    (
        "transaction does not balance per asset",
        """
        SELECT format('transaction %%s asset %%s sums to %%s', p.transaction_id, s.code,
                      sum(p.amount))
          FROM ledger_posting p JOIN ledger_asset s ON s.id = p.asset_id
         GROUP BY p.transaction_id, s.code HAVING sum(p.amount) <> 0
         LIMIT %(limit)s
        """,
    ),
    (
        "transaction has fewer than two postings",
        """
        SELECT format('transaction %%s (%%s) has %%s postings', t.id, t.idempotency_key,
                      count(p.id))
          FROM ledger_transaction t LEFT JOIN ledger_posting p ON p.transaction_id = t.id
         GROUP BY t.id HAVING count(p.id) < 2
         LIMIT %(limit)s
        """,
    ),
    (
        # The posting functions write first_posting_id themselves, unchecked by the
        # constraint trigger that polices other writers: checked here instead.
        "transaction does not name its first posting",
        """
        SELECT format('transaction %%s (%%s) names posting %%s; its first posting is %%s',
                      t.id, t.idempotency_key, t.first_posting_id, p.first)
          FROM ledger_transaction t
          JOIN (SELECT transaction_id, min(id) AS first FROM ledger_posting
                 GROUP BY transaction_id) p ON p.transaction_id = t.id
         WHERE t.first_posting_id <> p.first
         LIMIT %(limit)s
        """,
    ),
    (
        "asset does not sum to zero over all accounts",
        """
        SELECT format('asset %%s sums to %%s over all balances', s.code, sum(b.amount))
          FROM ledger_balance b JOIN ledger_asset s ON s.id = b.asset_id
         GROUP BY s.code HAVING sum(b.amount) <> 0
         LIMIT %(limit)s
        """,
    ),
    (
        "running balance (balance_after) differs from the sum of earlier postings",
        """
        SELECT format('posting %%s (account %%s asset %%s): balance_after %%s, running sum %%s',
                      id, account_id, asset_id, balance_after, running)
          FROM (SELECT id, account_id, asset_id, balance_after,
                       sum(amount) OVER (PARTITION BY account_id, asset_id
                                         ORDER BY recorded_at, id) AS running
                  FROM ledger_posting) r
         WHERE balance_after <> running
         LIMIT %(limit)s
        """,
    ),
    (
        "posting effective time differs from its transaction, or follows its recording",
        """
        SELECT format('posting %%s: effective %%s, transaction effective %%s, recorded %%s',
                      p.id, p.effective_at, t.effective_at, p.recorded_at)
          FROM ledger_posting p JOIN ledger_transaction t ON t.id = p.transaction_id
         WHERE p.effective_at <> t.effective_at OR p.effective_at > p.recorded_at
         LIMIT %(limit)s
        """,
    ),
    (
        "reversal does not negate the transaction it reverses",
        """
        SELECT format('transaction %%s reverses %%s but account %%s asset %%s nets to %%s',
                      r.id, r.reverses_id, x.account_id, x.asset_id, x.net)
          FROM ledger_transaction r
          CROSS JOIN LATERAL (
                SELECT account_id, asset_id, sum(amount) AS net FROM ledger_posting
                 WHERE transaction_id IN (r.id, r.reverses_id)
                 GROUP BY account_id, asset_id HAVING sum(amount) <> 0) x
         WHERE r.reverses_id IS NOT NULL
         LIMIT %(limit)s
        """,
    ),
    (
        "transaction dated in a closed period was recorded after the close",
        """
        SELECT format('transaction %%s effective %%s recorded %%s; period %%s closed at %%s',
                      t.id, t.effective_at, t.recorded_at, p.starts_at, p.closed_at)
          FROM ledger_transaction t JOIN ledger_period p
            ON p.status = 'closed' AND t.effective_at >= p.starts_at
           AND t.effective_at < p.ends_at AND t.recorded_at > p.closed_at
         LIMIT %(limit)s
        """,
    ),
)


def ledger_verify() -> list[str]:
    """Return every discrepancy found, as `rule: detail` lines; empty means the books hold."""
    found: list[str] = []
    with connection.cursor() as cursor:
        for rule, sql in CHECKS:
            cursor.execute(sql, {"limit": DISCREPANCIES_PER_CHECK_MAX})
            found.extend(f"{rule}: {detail}" for (detail,) in cursor.fetchall())
    return found
