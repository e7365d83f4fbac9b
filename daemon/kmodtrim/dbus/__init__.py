"""kmodtrim's D-Bus layer: the only code that imports dbus-next.

Names are versioned (``…1``); a future incompatible API gets new names beside these.
"""

from __future__ import annotations

BUS_NAME = "org.kmodtrim.KmodTrim1"
OBJECT_PATH = "/org/kmodtrim/KmodTrim1"
MANAGER_INTERFACE = "org.kmodtrim.KmodTrim1.Manager"
JOB_INTERFACE = "org.kmodtrim.KmodTrim1.Job"
JOB_PATH_PREFIX = OBJECT_PATH + "/job/"

# polkit actions (declared in the project's polkit policy file)
ACTION_TRIM = "org.kmodtrim.trim"
ACTION_RESTORE = "org.kmodtrim.restore"
ACTION_ROLLBACK = "org.kmodtrim.rollback"
ACTION_CONFIGURE = "org.kmodtrim.configure"


def job_path(job_id: int) -> str:
    """The object path of job ``job_id``."""
    return f"{JOB_PATH_PREFIX}{job_id}"
