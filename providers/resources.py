"""Export of usage records through django-import-export (export only: records are append-only)."""

from __future__ import annotations

from import_export import fields, resources

from providers.models import USAGE_RECORD_FIELDS, UsageRecord


class UsageRecordResource(resources.ModelResource):
    provider = fields.Field(attribute="provider__slug", column_name="provider")
    node = fields.Field(attribute="node__name", column_name="node")
    report = fields.Field(attribute="report__report_id", column_name="report_id")

    class Meta:
        model = UsageRecord
        fields = ("id", "provider", "node", "report", *USAGE_RECORD_FIELDS, "metadata")
        export_order = fields

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return super().get_queryset().select_related("provider", "node", "report")
