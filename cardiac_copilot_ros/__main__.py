"""``python -m cardiac_copilot_ros`` is ``cardiac-copilot``."""

import sys

from .cli import main

sys.exit(main())
