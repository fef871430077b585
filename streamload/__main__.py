"""``python -m streamload``: the command line (see ``streamload.cli``)."""

import sys

from streamload.cli import main

if __name__ == "__main__":
    sys.exit(main())
