"""Shared code of the pipeline's scripts; README.md's "How the code is laid out" says which module does what."""
import sys

if sys.version_info < (3, 10):  # before anything else fails on `X | None` annotations
    sys.exit(f"error: this project needs Python 3.10 or newer (this is {sys.version.split()[0]}); "
             f"create the virtual environment with a newer python3")
