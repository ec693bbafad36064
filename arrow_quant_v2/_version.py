"""The library version: a leaf, so modules that record it never import the package root."""
__version__ = "0.1.0"
