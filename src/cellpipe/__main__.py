"""``python -m cellpipe`` is the same as the ``cellpipe`` command."""

import sys

from cellpipe.cli import main

sys.exit(main())
