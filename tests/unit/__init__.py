"""The unit tier: decisions tested in memory (``pytest -m unit``), milliseconds each."""
