"""`manage.py ledger_verify`: recompute the books; exit 1 naming each discrepancy."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from ledger.verify import ledger_verify


class Command(BaseCommand):
    help = "Recompute every balance from postings and check every transaction balances."

    def handle(self, *args: Any, **options: Any) -> None:
        discrepancies = ledger_verify()
        for line in discrepancies:
            self.stderr.write(line)
        if discrepancies:
            raise CommandError(f"{len(discrepancies)} discrepancies found")
        self.stdout.write("ledger_verify: the books hold (balances, transactions, assets)")
