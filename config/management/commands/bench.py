"""`python manage.py bench <suite> [--json]`: performance figures, printed as JSON.

Each suite lives beside the code it measures (`ledger/bench.py`, `providers/bench.py`)
and exposes `add_arguments(parser)` and `run(options) -> dict`. Suites create their
own data in a scratch database (config/scratch.py), never in the one in use.
"""

import importlib
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

SUITES = {
    "ledger": "ledger.bench",
    "ingest": "providers.bench",
}


class Command(BaseCommand):
    help = "Run a benchmark suite and print its figures as JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        subparsers = parser.add_subparsers(dest="suite", required=True)
        for name, module_path in SUITES.items():
            sub = subparsers.add_parser(name, help=f"benchmark {name}")
            sub.add_argument("--json", action="store_true", help="print JSON only")
            sub.add_argument("--keep", action="store_true", help="keep the scratch database")
            importlib.import_module(module_path).add_arguments(sub)

    def handle(self, *args: Any, **options: Any) -> None:
        module = importlib.import_module(SUITES[options["suite"]])
        figures = module.run(options)
        self.stdout.write(json.dumps(figures, indent=None if options["json"] else 2))
