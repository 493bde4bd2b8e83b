"""`python -m handoff ARGS` runs the `handoff` binary installed with this package."""

import os
import sys

from .server import binary


def main() -> None:
    path = binary()
    os.execv(path, [path, *sys.argv[1:]])


if __name__ == "__main__":
    main()
