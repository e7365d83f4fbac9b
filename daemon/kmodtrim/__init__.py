"""kmodtrim: keep a machine's installed kernel modules down to what it uses."""

__version__ = "0.1.0"
