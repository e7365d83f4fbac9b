"""The ``kmodtrim`` command line: parser.py (the one parser), main.py (dispatch and
errors), read.py and change.py (the verbs), remote.py (through kmodtrimd), render.py
(human output of the use cases' documents), jsonout.py (their ``--json`` output), term.py
(stderr, colour, progress, prompts), docs.py (man pages and completion from the parser)."""

from .main import main
from .parser import UsageExit, build_parser

__all__ = ["UsageExit", "build_parser", "main"]
