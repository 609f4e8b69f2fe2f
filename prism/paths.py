"""Where the project finds shared data and caches (overridable by environment variables)."""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real data lives beside the checkout in ../shared/data and is read from there, never copied.
DATA_ROOT = os.environ.get("PRISM_DATA", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))
CACHE_ROOT = os.environ.get("PRISM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prism"))
