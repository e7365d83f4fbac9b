"""The resident daemon's rooms, none of which imports D-Bus: the job slot (jobs.py), the
daemon's state and operations (core.py), observation and self-healing (watch.py), the
kernel-event queue (kernel_events.py) and systemd's notify socket and journal
(systemd.py). kmodtrim.daemon, the composition root, wires them to kmodtrim.dbus.

Idle means idle and small: these modules import only what listening, authorising and
queueing need; the index, planner, policy and engine are imported when a job or a read
call first needs them.
"""
