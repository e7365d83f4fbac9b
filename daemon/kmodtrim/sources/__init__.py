"""Restore sources: where a file out of the tree comes back from — the local stash
(state/stash.py) or the package archive (archive.py) — and which files keep a local copy
(choice.py, likely.py)."""
