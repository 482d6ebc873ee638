"""Read-only admin of the books, the journal export, and closing a period.

Nothing posted can be edited here (the database would refuse it anyway); corrections
go through `ledger.services.transaction_reverse`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import BadRequest, PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.http import urlencode

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
    # Relations every row shows, read with it (a query per row otherwise).
    related: tuple[str, ...] = ()

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        rows = super().get_queryset(request)
        return rows.select_related(*self.related) if self.related else rows  # () would mean all


@admin.register(Asset)
class AssetAdmin(ReadOnlyAdmin):
    list_display = ["code", "scale", "name", "created_at"]
    search_fields = ["code", "name"]


class BalanceInline(ReadOnlyInline):
    model = Balance
    related = ("account", "asset")
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
    related = ("account", "asset")
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
        """Show the list, with a button exporting the journal of the effective times in view."""
        since, until = _filtered_effective_range(request)
        bounds = {
            name: value.isoformat()
            for name, value in (("since", since), ("until", until))
            if value is not None
        }
        url = reverse("admin:ledger_journal_export")
        extra_context = {
            **(extra_context or {}),
            "journal_export_url": f"{url}?{urlencode(bounds)}" if bounds else url,
            "journal_export_range": _range_label(since, until),
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
    """Return the ISO time `value` (in the current time zone if it names none), or None."""
    if not value:
        return None
    try:
        parsed = parse_datetime(value)
    except ValueError:  # well formed, out of range: 2026-13-01
        parsed = None
    if parsed is None:
        raise BadRequest(f"not an ISO time: {value!r}")
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


def _filtered_effective_range(request: HttpRequest) -> tuple[datetime | None, datetime | None]:
    """Return the effective-time range the change list is filtered to: [since, until).

    From the "By effective at" filter (effective_at__gte/__lt) or the date hierarchy
    (effective_at__year/__month/__day, in the current time zone, as the list reads it).
    A value the list itself would reject bounds nothing here.
    """
    params = request.GET
    since = _parse_time_or_none(params.get("effective_at__gte"))
    until = _parse_time_or_none(params.get("effective_at__lt"))
    try:
        year = int(params["effective_at__year"])
        month = int(params.get("effective_at__month", 0))
        day = int(params.get("effective_at__day", 0))
        start = datetime(year, month or 1, day or 1, tzinfo=timezone.get_current_timezone())
        if day:
            end = start + timedelta(days=1)
        elif month:
            end = start.replace(year=year + month // 12, month=month % 12 + 1)
        else:
            end = start.replace(year=year + 1)
    except (KeyError, ValueError, OverflowError):  # no hierarchy, or none a date can end
        return since, until
    return max(filter(None, (since, start))), min(filter(None, (until, end)))


def _parse_time_or_none(value: str | None) -> datetime | None:
    try:
        return _parse_time(value)
    except BadRequest:
        return None


def _range_label(since: datetime | None, until: datetime | None) -> str:
    """Return the export's bounds as a person reads them, or "" for the whole journal."""

    def local(at: datetime) -> str:
        return f"{timezone.localtime(at):%Y-%m-%d %H:%M}"

    zone = timezone.get_current_timezone_name()
    if since and until:
        return f"effective from {local(since)} to before {local(until)} ({zone})"
    if since:
        return f"effective from {local(since)} ({zone})"
    if until:
        return f"effective before {local(until)} ({zone})"
    return ""


@admin.register(Balance)
class BalanceAdmin(ReadOnlyAdmin):
    list_display = ["account", "asset", "balance", "posting_count", "updated_at"]
    list_filter = ["asset"]
    search_fields = ["account__code"]
    list_select_related = ["account", "asset"]

    @admin.display(description="balance (debit +, credit -)", ordering="amount")
    def balance(self, obj: Balance) -> str:
        """The amount in the asset's units (USD to its accrual scale), not its smallest unit."""
        return format_amount(obj.amount, obj.asset.scale)


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
