"""TVKD: Teacher Value-based Knowledge Distillation (see docs in README and MATH.md).

The library is pure torch + transformers: no web, queue or database imports here.
"""

__version__ = "0.1.0"
