"""moe-runtime: profile, tune and serve Mixture-of-Experts language models.

Importing this package never touches CUDA and never loads the compiled extension eagerly.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
