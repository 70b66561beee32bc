"""`python -m vmrestore` is the same as the `vmrestore` command."""

import sys

from vmrestore.cli import main

sys.exit(main())
