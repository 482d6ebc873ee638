"""Read-only admin of the books, the journal export, and closing a period.

Nothing posted can be edited here (the database would refuse it anyway); corrections
go through `ledger.services.transaction_reverse`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import URLPattern, path, reverse
from django.utils.dateparse import parse_datetime
from django.utils.html import format_html

from ledger import services
from ledger.models import Account, Asset, Balance, Period, Posting, Transaction
from ledger.selectors import JOURNAL_COLUMNS, format_amount, journal_rows


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):  # type: ignore[type-arg]
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Asset)
class AssetAdmin(ReadOnlyAdmin):
    list_display = ["code", "scale", "name", "created_at"]
    search_fields = ["code", "name"]


class BalanceInline(ReadOnlyInline):
    model = Balance
    fields = ("asset", "amount_display", "posting_count", "updated_at")
    readonly_fields = fields

    @admin.display(description="balance (debit +, credit -)")
    def amount_display(self, obj: Balance) -> str:
        return format_amount(obj.amount, obj.asset.scale)


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ["code", "kind", "owner", "created_at"]
    list_filter = ["kind"]
    search_fields = ["code", "owner"]
    inlines = [BalanceInline]


class PostingInline(ReadOnlyInline):
    model = Posting
    fields = ("account", "asset", "debit", "credit", "balance_after", "recorded_at")
    readonly_fields = fields

    def debit(self, obj: Posting) -> str:
        return format_amount(obj.amount, obj.asset.scale) if obj.amount > 0 else ""

    def credit(self, obj: Posting) -> str:
        return format_amount(-obj.amount, obj.asset.scale) if obj.amount < 0 else ""


@admin.register(Transaction)
class TransactionAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "idempotency_key",
        "description",
        "effective_at",
        "recorded_at",
        "reverses",
    ]
    list_filter = [("effective_at", admin.DateFieldListFilter)]
    search_fields = ["idempotency_key", "description"]
    date_hierarchy = "effective_at"
    inlines = [PostingInline]
    show_full_result_count = False  # counting millions of rows on every page is slow

    def get_urls(self) -> list[URLPattern]:
        journal = path(
            "journal.csv",
            self.admin_site.admin_view(self.journal_export),
            name="ledger_journal_export",
        )
        return [journal, *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        extra_context = {
            **(extra_context or {}),
            "title": format_html(
                'Transactions — <a href="{}">export the journal (CSV)</a>',
                reverse("admin:ledger_journal_export"),
            ),
        }
        return super().changelist_view(request, extra_context)

    def journal_export(self, request: HttpRequest) -> StreamingHttpResponse:
        """Stream the journal as CSV; ?since=&until= (ISO times) bound the effective time."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        since = _parse_time(request.GET.get("since"))
        until = _parse_time(request.GET.get("until"))
        response = StreamingHttpResponse(
            _csv_lines(journal_rows(since=since, until=until)), content_type="text/csv"
        )
        response["Content-Disposition"] = 'attachment; filename="journal.csv"'
        return response


class _Echo:
    def write(self, value: str) -> str:
        return value


_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def _csv_cell(value: object) -> object:
    # A text cell starting with = + - @ is a formula to a spreadsheet: quote it as text.
    if isinstance(value, str) and value[:1] and value[0] in "=+-@\t\r" and not _NUMBER.match(value):
        return "'" + value
    return value


def _csv_lines(rows: Iterator[tuple[object, ...]]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(JOURNAL_COLUMNS)
    for row in rows:
        yield writer.writerow([_csv_cell(value) for value in row])


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = parse_datetime(value)
    if parsed is None:
        raise PermissionDenied(f"not an ISO time: {value!r}")
    return parsed


@admin.register(Balance)
class BalanceAdmin(ReadOnlyAdmin):
    list_display = ["account", "asset", "amount", "posting_count", "updated_at"]
    list_filter = ["asset"]
    search_fields = ["account__code"]
    list_select_related = ["account", "asset"]


@admin.register(Period)
class PeriodAdmin(ReadOnlyAdmin):
    list_display = ["starts_at", "ends_at", "status", "closed_at", "closed_by", "close_note"]
    list_filter = ["status"]
    actions = ["close_periods"]

    @admin.action(description="Close the selected periods", permissions=["close"])
    def close_periods(self, request: HttpRequest, queryset: QuerySet[Period]) -> None:
        for period in queryset.order_by("starts_at"):
            services.period_close(period_id=period.pk, closed_by_id=request.user.pk)
        self.message_user(request, f"Closed {queryset.count()} periods.", messages.SUCCESS)

    def has_close_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("ledger.change_period"))
