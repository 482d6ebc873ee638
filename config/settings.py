"""Settings, all from the environment.

DEBUG is off unless DJANGO_DEBUG=1; with it off, a missing secret key or allowed-hosts
setting stops start-up with a clear message instead of running insecurely.
"""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _load_env_file() -> None:
    """Read KEY=VALUE lines from DJANGO_ENV_FILE (default .env.development) into os.environ.

    `make` writes .env.development in a developer checkout (DEBUG on, a random secret),
    so `python manage.py ...` works there without exports. Production has no such file
    and sets the environment itself; variables already set always win.
    """
    path = Path(os.environ.get("DJANGO_ENV_FILE", BASE_DIR / ".env.development"))
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            os.environ.setdefault(key.strip(), value.strip())


_load_env_file()


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


DEBUG = _env_bool("DJANGO_DEBUG")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Set it (50+ random characters) or run with "
            "DJANGO_DEBUG=1 for local development."
        )
    SECRET_KEY = "insecure-development-key-only-used-with-DJANGO_DEBUG=1-" + "x" * 20

ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS")
if not ALLOWED_HOSTS:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_ALLOWED_HOSTS is not set. Give a comma-separated list of host names, "
            "e.g. DJANGO_ALLOWED_HOSTS=ledger.example.com"
        )
    ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
CSRF_TRUSTED_ORIGINS = _env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "import_export",
    "django_celery_beat",
    "config",
    "ledger",
    "providers",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from the web process itself: no second server to set up (WhiteNoise).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database_url() -> str:
    """Return DATABASE_URL, or the URL of the embedded server `make` started."""
    url = os.environ.get("DATABASE_URL", "")
    if url:
        return url
    embedded = BASE_DIR / ".pgdata" / "DATABASE_URL"
    if embedded.exists():
        return embedded.read_text().strip()
    # Commands that need no database (check, makemigrations) still work; the first
    # query fails to connect until `make db` starts the embedded server.
    port = os.environ.get("EMBEDDED_PG_PORT", "54329")
    return f"postgresql://postgres@127.0.0.1:{port}/tokenledger"


DATABASES = {
    "default": dj_database_url.parse(
        _database_url(), conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "60"))
    )
}
DATABASES["default"]["ENGINE"] = "config.db"
DATABASES["default"].setdefault("TEST", {})["NAME"] = os.environ.get(
    "TEST_DATABASE_NAME", "test_" + DATABASES["default"]["NAME"]
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / ".static"

# --- Security: secure by default, relaxed only for local DEBUG runs over plain HTTP.
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
if not DEBUG:
    SECURE_SSL_REDIRECT = _env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]


# --- Celery. With CELERY_BROKER_URL unset, the broker is kombu's SQLAlchemy transport
# on the same PostgreSQL: zero setup, durable, and still a separate worker process.
def _default_broker_url() -> str:
    db = DATABASES["default"]
    host = db.get("HOST") or ""
    port = db.get("PORT") or 5432
    auth = db.get("USER") or "postgres"
    if db.get("PASSWORD"):
        auth += ":" + str(db["PASSWORD"])
    if host.startswith("/"):
        return f"sqla+postgresql+psycopg://{auth}@/{db['NAME']}?host={host}"
    return f"sqla+postgresql+psycopg://{auth}@{host}:{port}/{db['NAME']}"


CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or _default_broker_url()
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 600
CELERY_TASK_SOFT_TIME_LIMIT = 540
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = 5
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "ledger-periods-open-ahead": {"task": "ledger.tasks.periods_open_ahead", "schedule": 3600.0},
}

# --- REST framework and OpenAPI.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "config.errors.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tokenledger API",
    "DESCRIPTION": "Usage ingestion for model providers' inference nodes, and the "
    "statements and balances of enterprises.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}

# --- Usage ingestion limits (documented in README and the OpenAPI description).
USAGE_RECORDS_PER_REPORT_MAX = int(os.environ.get("USAGE_RECORDS_PER_REPORT_MAX", "5000"))
USAGE_REPORT_BODY_BYTES_MAX = int(os.environ.get("USAGE_REPORT_BODY_BYTES_MAX", str(4 * 2**20)))
USAGE_REPORTS_PER_MINUTE_PER_KEY = int(os.environ.get("USAGE_REPORTS_PER_MINUTE_PER_KEY", "600"))
USAGE_FUTURE_SKEW_SECONDS_MAX = int(os.environ.get("USAGE_FUTURE_SKEW_SECONDS_MAX", "300"))
DATA_UPLOAD_MAX_MEMORY_SIZE = USAGE_REPORT_BODY_BYTES_MAX + 2**16
