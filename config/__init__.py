"""Project settings package; also loads the Celery app so tasks register with Django."""

from config.celery import app as celery_app

__all__ = ["celery_app"]
