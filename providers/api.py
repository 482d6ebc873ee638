"""The ingestion API: thin views over providers.services and providers.selectors."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle
from rest_framework.views import APIView

from providers import openapi
from providers.auth import IsNode, NodeCaller, NodeKeyAuthentication
from providers.exceptions import BodyTooLargeError, RateLimitedError, UnsupportedMediaTypeError
from providers.selectors import usage_report_get, usage_report_status
from providers.services import node_key_rate_count, usage_report_ingest

SIGNATURE_HEADER = "Tokenledger-Signature"


class NodeKeyRateThrottle(BaseThrottle):
    """USAGE_REPORTS_PER_MINUTE_PER_KEY, counted in PostgreSQL; raises RateLimitedError."""

    def allow_request(self, request: Request, view: Any) -> bool:
        node_key_rate_count(key=request.auth)
        return True


class NodeApiView(APIView):
    authentication_classes = [NodeKeyAuthentication]
    permission_classes = [IsNode]

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)
        if getattr(exc, "auth_header", None):
            response["WWW-Authenticate"] = exc.auth_header
        if isinstance(exc, RateLimitedError):
            response["Retry-After"] = str(exc.retry_after_s)
        return response


def _error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(openapi.ErrorSerializer) for status in statuses}


class UsageReportCreateApi(NodeApiView):
    throttle_classes = [NodeKeyRateThrottle]
    parser_classes = [JSONParser]  # documents the media type; the body is read raw

    @extend_schema(
        operation_id="usage_report_create",
        summary="Post a usage report",
        description="Store a report whole, or reject it whole listing every problem "
        "(extra.fields, with JSON paths). The first answer is 201; a replay of the same "
        "report_id with the same content is 200 with the identical body.\n\n"
        + openapi.limits_description(),
        request=openapi.UsageReportSerializer,
        examples=[openapi.REPORT_EXAMPLE],
        parameters=[
            OpenApiParameter(
                SIGNATURE_HEADER,
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                required=False,
                description="ed25519=<base64 Ed25519 signature of the exact request body>; "
                "required for nodes with a registered public key.",
            )
        ],
        responses={
            201: openapi.UsageReportAnswerSerializer,
            200: OpenApiResponse(openapi.UsageReportAnswerSerializer, description="Replay."),
            **_error_responses(400, 401, 409, 413, 415, 429),
        },
    )
    def post(self, request: Request) -> HttpResponse:
        if request.content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaTypeError("Send the report as Content-Type: application/json.")
        body_bytes_max = settings.USAGE_REPORT_BODY_BYTES_MAX
        try:
            content_length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            content_length = 0
        if content_length > body_bytes_max:
            raise BodyTooLargeError(
                f"A report body may be at most {body_bytes_max} bytes.",
                extra={"body_bytes_max": body_bytes_max},
            )
        result = usage_report_ingest(
            key=request.auth,
            body=request.body,
            signature=request.META.get("HTTP_TOKENLEDGER_SIGNATURE"),
        )
        return HttpResponse(
            result.body, status=201 if result.created else 200, content_type="application/json"
        )


class UsageReportDetailApi(NodeApiView):
    @extend_schema(
        operation_id="usage_report_retrieve",
        summary="Where a report stands",
        description="Status and counts of one of the calling provider's reports; another "
        "provider's report_id is 404 like an unknown one.",
        responses={
            200: openapi.UsageReportStatusSerializer,
            **_error_responses(401, 404),
        },
    )
    def get(self, request: Request, report_id: str) -> Response:
        caller: NodeCaller = request.user
        report = usage_report_get(provider=caller.provider, report_id=report_id)
        return Response(usage_report_status(report=report))
