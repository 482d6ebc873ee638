"""PostgreSQL backend that lets `flush` empty the append-only books.

The ledger's triggers refuse UPDATE, DELETE and TRUNCATE of posted rows. Emptying a
whole database (test teardown, `manage.py flush`) is an operator's act, so it runs
with `session_replication_role = replica`, which only a superuser may set: the
application role in production cannot, and its flush fails instead of erasing books.
"""

from django.db.backends.postgresql import base, operations


class DatabaseOperations(operations.DatabaseOperations):
    def execute_sql_flush(self, sql_list: list[str]) -> None:
        super().execute_sql_flush(["SET LOCAL session_replication_role = replica", *sql_list])


class DatabaseWrapper(base.DatabaseWrapper):
    ops_class = DatabaseOperations
