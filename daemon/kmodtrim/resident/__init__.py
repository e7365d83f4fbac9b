"""The resident daemon's rooms, none of which imports D-Bus: the job slot (jobs.py), the
daemon's state and operations (core.py), observation and self-healing (watch.py), the
kernel-event queue (kernel_events.py), systemd's notify socket and journal (systemd.py),
and the worker processes that do the heavy work (spawn.py starts them, worker.py is what
they run). kmodtrim.daemon, the composition root, wires them to kmodtrim.dbus.

Idle means idle and small: the daemon imports only what listening, authorising and
queueing need. The index, planner, policy and engine are imported by workers only: one
process per job, start-up, Plan or Explain call, automatic-trim check and self-heal, which
exits when done.
"""
