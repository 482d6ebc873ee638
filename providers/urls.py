from django.urls import path

from providers import api

urlpatterns = [
    path("usage/reports", api.UsageReportCreateApi.as_view(), name="usage-report-create"),
    path(
        "usage/reports/<str:report_id>",
        api.UsageReportDetailApi.as_view(),
        name="usage-report-detail",
    ),
]
