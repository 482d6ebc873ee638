"""The Celery application: broker from CELERY_BROKER_URL, tasks discovered per app."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("tokenledger")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
