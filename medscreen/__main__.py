"""`python -m medscreen`: the command line, as the `medscreen` script runs it."""
import sys

from medscreen.cli import main

sys.exit(main())
