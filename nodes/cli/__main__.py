"""`python -m nodes.cli`: see `command.py`."""
import sys

from .command import main

sys.exit(main())
