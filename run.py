#!/usr/bin/env python
"""The one entry point: ``python run.py {train,sample,eval} CONFIG.gin [...] [--bind ...]`` (``prism.cli``;
installed, the ``prism`` command is the same)."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
if REPO_ROOT not in sys.path:  # `python run.py` from a checkout that is not installed
    sys.path.insert(0, REPO_ROOT)

from prism.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
