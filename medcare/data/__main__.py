"""`python -m medcare.data check FILE...` (see medcare.data.check)."""

import sys

from .check import main

sys.exit(main())
