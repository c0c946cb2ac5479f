"""`python -m flipsafe` runs the command-line interface."""

import sys

from flipsafe.cli import main

sys.exit(main())
