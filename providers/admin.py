"""Finance staff's view of providers, nodes, keys and usage. Usage is read-only here."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from import_export.admin import ExportMixin

from providers.models import (
    USAGE_RECORD_FIELDS,
    InferenceNode,
    NodeApiKey,
    Provider,
    UsageConflict,
    UsageRecord,
    UsageReport,
)
from providers.resources import UsageRecordResource
from providers.services import node_key_create, node_key_revoke, public_key_parse

RECORDS_INLINE_MAX = 50


class ReadOnlyAdminMixin:
    """No add, change or delete: the rows are facts (a trigger refuses changes anyway)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "created_at"]
    search_fields = ["slug", "name"]
    prepopulated_fields = {"slug": ["name"]}


class NodeApiKeyInline(admin.TabularInline):
    model = NodeApiKey
    fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class InferenceNodeForm(forms.ModelForm):
    class Meta:
        model = InferenceNode
        fields = ["provider", "name", "public_key_ed25519"]
        help_texts = {
            "public_key_ed25519": "Base64 of the raw 32-byte Ed25519 public key. Once set, "
            "the node must sign every report."
        }

    def clean_public_key_ed25519(self) -> str:
        value = self.cleaned_data["public_key_ed25519"].strip()
        if value:
            try:
                public_key_parse(public_key_b64=value)
            except ValueError as exc:
                raise forms.ValidationError(str(exc)) from exc
        return value


@admin.register(InferenceNode)
class InferenceNodeAdmin(admin.ModelAdmin):
    form = InferenceNodeForm
    list_display = ["name", "provider", "public_key_ed25519", "created_at"]
    list_filter = ["provider"]
    search_fields = ["name", "provider__slug"]
    inlines = [NodeApiKeyInline]


@admin.register(NodeApiKey)
class NodeApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "node", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["node__provider", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["prefix", "node__name", "node__provider__slug"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    fields = ["node", "prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [*self.readonly_fields, "node"] if obj else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: NodeApiKey, form: Any, change: bool) -> None:
        if change:
            return  # nothing of a key is editable; revoke with the action
        key, key_text = node_key_create(node=obj.node)
        obj.pk, obj.prefix = key.pk, key.prefix
        obj.refresh_from_db()
        self.message_user(
            request,
            f"New key for {key.node}: {key_text} — copy it now, it is not shown again.",
            messages.WARNING,
        )

    # Revoking changes a key: a staff member who may only view keys does not get it.
    @admin.action(description="Revoke the selected keys (refused at once)", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[NodeApiKey]) -> None:
        for key in queryset:
            node_key_revoke(key=key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)


class UsageRecordInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = UsageRecord
    fields = list(USAGE_RECORD_FIELDS)
    readonly_fields = fields
    extra = 0
    verbose_name_plural = f"records (first {RECORDS_INLINE_MAX}; export for all)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        ids = list(
            super()
            .get_queryset(request)
            .order_by("id")
            .values_list("id", flat=True)[:RECORDS_INLINE_MAX]
        )
        return UsageRecord.objects.filter(id__in=ids).order_by("id")


@admin.register(UsageReport)
class UsageReportAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "report_id",
        "provider",
        "node",
        "status",
        "hold_reason",
        "records_received",
        "records_accepted",
        "records_duplicate",
        "records_conflict",
        "signed",
        "received_at",
    ]
    list_filter = ["provider", "node", "status", "hold_reason", "signed", "received_at"]
    search_fields = ["report_id"]
    date_hierarchy = "received_at"
    list_select_related = ["provider", "node"]
    exclude = ["content_sha256", "signed_body"]
    inlines = [UsageRecordInline]


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdminMixin, ExportMixin, admin.ModelAdmin):
    resource_classes = [UsageRecordResource]
    list_display = [
        "request_id",
        "provider",
        "node",
        "enterprise",
        "model",
        "occurred_at",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "service_tier",
    ]
    list_filter = ["provider", "service_tier", "occurred_at"]
    search_fields = ["request_id", "enterprise", "model"]
    list_select_related = ["provider", "node"]
    exclude = ["content_sha256"]
    show_full_result_count = False  # COUNT(*) over millions of records is slow


@admin.register(UsageConflict)
class UsageConflictAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["request_id", "report", "existing_record", "created_at"]
    list_filter = ["report__provider", "created_at"]
    search_fields = ["request_id"]
    list_select_related = ["report", "existing_record"]
