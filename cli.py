"""Thin entry point: `python cli.py chat ...` is the same as `offload-moe chat ...`."""

import sys

from offload_moe.cli import main

if __name__ == "__main__":
    sys.exit(main())
