"""The demo and its synthetic data: phantoms, registry sample volumes, the whole-chain runner and its report.

Not imported by the bundles; the library they import is ``custom_nets``.
"""
