"""``python -m workers.report``: the same as ``hdet report``."""

import sys

from workers.report.cli import main

sys.exit(main())
