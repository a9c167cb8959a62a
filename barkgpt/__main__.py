"""``python -m barkgpt`` runs the command line."""

import sys

from barkgpt.cli import main

sys.exit(main())
