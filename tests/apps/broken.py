"""An app module that fails on import (for the CLI error tests)."""

ratio = 1 / 0
