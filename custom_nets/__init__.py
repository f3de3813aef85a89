"""MeDUET: disentangled unified pretraining for 3D medical image synthesis and analysis.

Shared package imported by the MONAI bundles under ``bundles/``: networks (``nets``), losses
(``losses``), training steps (``engines``), data handling (``data``) and helpers (``utils``).
"""

__version__ = "0.1.0"
