"""Fleets: what many hosts observed, merged into what the next image keeps.

kmodtrim runs no fleet server; these documents travel by the fleet's own tools (Ansible,
osquery's result logs, any file copy):

- host.py: a host's identity read below a root (os-release, a hash of the machine id,
  DMI platform, installed kernels) — the only reader here;
- export.py: the observation export (``kmodtrim observe --export``), a pure function of
  the host's facts and its recorded observations;
- sources.py: the inputs of a merge as HostObservation values, and an export parsed
  into one; osquery.py: osquery ``kernel_modules`` result logs parsed into them;
- read.py: the fleet's files read (bounded) and told apart (export or osquery log);
- merge.py: the fleet merge (``kmodtrim fleet merge``), pure, deterministic;
- formats.py: a merge rendered for image builders (mkosi, dracut, a kmodtrim policy
  drop-in; ``kmodtrim fleet export``).

The documents are described in kmodtrim/documents.py (FLEET_DOCUMENTS).
"""
