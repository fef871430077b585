"""``python -m streamload.distributed`` (and ``torchrun -m streamload.distributed``): the command
(see ``streamload.distributed._command``)."""

import sys

from streamload.distributed._command import main

if __name__ == "__main__":
    sys.exit(main())
