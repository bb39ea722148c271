#!/usr/bin/env python
"""Django's command line for the example site (run from the repository's root: python examples/django_app/manage.py ...)."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.mysite.settings")
    from django.core.management import execute_from_command_line
    execute_from_command_line(sys.argv)
