"""seqrec: nightly transformer sequential recommendations on Ray."""

__version__ = "0.1.0"
