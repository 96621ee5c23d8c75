"""liverstage runtime: volume loading, liver crops, inference backends, reports.

This package must never import torch (the scanner-side workstation has none).
"""

__version__ = "0.1.0"
