"""kmodtrim's own state beside the record files of store.py: the stash of removed files
(stash.py) and its self-describing pack format (packfile.py)."""
