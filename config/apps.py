from django.apps import AppConfig


class ConfigConfig(AppConfig):
    """Project-level commands (bench, demo_load, run) and the health check."""

    name = "config"
    verbose_name = "Tokenledger"
