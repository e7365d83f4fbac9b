"""kmodtrimd's D-Bus contract, declared once: every interface, method, property and signal
with its arguments, D-Bus signature, polkit action, ``a{sv}`` options and a doc line.

What reads it: the service (service.py builds its interfaces and dispatch table from it),
the client (signatures and option types), the bus-policy test, and the contract file
``units/org.kmodtrim.KmodTrim1.xml``, which is written from it::

    python -m kmodtrim.dbus.api > units/org.kmodtrim.KmodTrim1.xml

A test checks that file against this table and against a running daemon's introspection.
Options and their types come from kmodtrim.request (one table for the CLI and D-Bus).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from ..request import Option, options_of
from . import (
    ACTION_CONFIGURE,
    ACTION_RESTORE,
    ACTION_ROLLBACK,
    ACTION_TRIM,
    BUS_NAME,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_PATH,
)

DOC_ANNOTATION = "org.freedesktop.DBus.DocString"
INTROSPECT_DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection '
                      '1.0//EN"\n "http://www.freedesktop.org/standards/dbus/1.0/'
                      'introspect.dtd">')

__all__ = [
    "ACTION_CONFIGURE", "ACTION_RESTORE", "ACTION_ROLLBACK", "ACTION_TRIM", "DOCUMENT_SCHEMA",
    "INTERFACES", "JOB", "JOB_ACTION", "JOB_TYPE_ACTIONS", "MANAGER", "OPTION_ACTIONS",
    "Arg", "Interface", "Method", "Property", "Signal", "introspection_xml", "method_doc",
    "options_doc",
]

# Cancel is authorised by the action of the job's own type.
JOB_ACTION = "(the action of the job's type)"
JOB_TYPE_ACTIONS = {"trim": ACTION_TRIM, "kernel-install": ACTION_TRIM,
                    "rollback": ACTION_ROLLBACK, "restore": ACTION_RESTORE}

# Options naming files make the daemon read them as root: uid 0 or this action, even on
# methods open to everyone.
OPTION_ACTIONS = {"observed": ACTION_CONFIGURE, "policy": ACTION_CONFIGURE}

# The version of the JSON documents Plan and Explain return (their "schema" key).
DOCUMENT_SCHEMA = 1


@dataclass(frozen=True)
class Arg:
    name: str
    signature: str


@dataclass(frozen=True)
class Method:
    """A method. ``action`` is the polkit action a caller other than uid 0 needs (None:
    open to everyone, bounded as a read call); ``options`` the keys its ``a{sv}`` takes."""

    name: str
    doc: str
    in_args: tuple[Arg, ...] = ()
    out_args: tuple[Arg, ...] = ()
    action: str | None = None

    @property
    def in_signature(self) -> str:
        return "".join(a.signature for a in self.in_args)

    @property
    def out_signature(self) -> str:
        return "".join(a.signature for a in self.out_args)

    @property
    def options(self) -> tuple[Option, ...]:
        return options_of(self.name)

    @property
    def read_only(self) -> bool:
        return self.action is None


@dataclass(frozen=True)
class Property:
    """A read-only property (PropertiesChanged is emitted when it changes)."""

    name: str
    signature: str
    doc: str


@dataclass(frozen=True)
class Signal:
    name: str
    doc: str
    args: tuple[Arg, ...] = ()

    @property
    def signature(self) -> str:
        return "".join(a.signature for a in self.args)


@dataclass(frozen=True)
class Interface:
    name: str
    doc: str
    methods: tuple[Method, ...] = ()
    properties: tuple[Property, ...] = ()
    signals: tuple[Signal, ...] = ()

    def method(self, name: str) -> Method:
        """Raises KeyError for a method the interface does not have."""
        return {m.name: m for m in self.methods}[name]

    def property(self, name: str) -> Property:
        """Raises KeyError for a property the interface does not have."""
        return {p.name: p for p in self.properties}[name]

    def signal(self, name: str) -> Signal:
        """Raises KeyError for a signal the interface does not have."""
        return {s.name: s for s in self.signals}[name]


_OPTIONS = Arg("options", "a{sv}")
_JOB = (Arg("job_id", "u"), Arg("job", "o"))

MANAGER = Interface(
    MANAGER_INTERFACE,
    f"kmodtrim on {OBJECT_PATH}: plans and trims the installed kernel modules of one root "
    "and restores them; one job at a time.",
    methods=(
        Method("Plan", "The plan kmodtrim would apply, as the JSON document `kmodtrim plan "
               "--json` prints (with \"schema\": 1). Open to everyone.",
               (_OPTIONS,), (Arg("plan", "s"),)),
        Method("Explain", "Why a module (name or alias) is kept or removed, as the JSON "
               "document `kmodtrim explain --json` prints (with \"schema\": 1). Open to "
               "everyone; NoSuchModule for a name the kernel does not know.",
               (Arg("name", "s"), _OPTIONS), (Arg("explanation", "s"),)),
        Method("ListGenerations", "Every generation, oldest first: generation (x), created "
               "(s), action (s), description (s), removed_files (x), removed_bytes (x), "
               "current (b). Open to everyone.",
               (), (Arg("generations", "aa{sv}"),)),
        Method("ShowGeneration", "One generation's manifest, keyed as in `kmodtrim show "
               "--json`; a key whose value is null is left out, and each package's "
               "metadata is JSON text. Open to everyone; NoSuchGeneration if there is none.",
               (Arg("generation", "u"),), (Arg("manifest", "a{sv}"),)),
        Method("Trim", "Plan and apply as a job (`kmodtrim apply`); returns the job at once, "
               "JobRemoved tells its end. Busy while another job runs; an identical request "
               "joins it.", (_OPTIONS,), _JOB, ACTION_TRIM),
        Method("Rollback", "Go back to a generation (or, with the option latest, undo the "
               "latest one) as a job.",
               (Arg("generation", "u"), _OPTIONS), _JOB, ACTION_ROLLBACK),
        Method("Restore", "Put modules back (with their dependencies and firmware) as a job.",
               (Arg("names", "as"), _OPTIONS), _JOB, ACTION_RESTORE),
        Method("KernelEvent", "A kernel was installed (add) or removed (remove): queued on "
               "disk and handled once the package manager's transaction has ended. Returns "
               "the number of queued events at once.",
               (Arg("action", "s"), Arg("kernel", "s"), _OPTIONS), (Arg("pending", "u"),),
               ACTION_TRIM),
    ),
    properties=(
        Property("Version", "s", "kmodtrim's version."),
        Property("KernelRelease", "s", "The kernel requests default to: the running kernel "
                 "if installed, else the newest."),
        Property("Root", "s", "The root this daemon serves: / on a live system, else an "
                 "image root."),
        Property("State", "s", "busy (starting up or running a job) or idle."),
        Property("CurrentGeneration", "u", "The number of the current generation."),
        Property("ObservedSince", "t", "When the oldest recorded boot was first seen "
                 "(seconds since the epoch; 0: none)."),
        Property("PendingKernelEvents", "as", "Kernel installs and removals handed over and "
                 "not handled yet, oldest first (\"add 6.1.0-9-amd64\")."),
    ),
    signals=(
        Signal("JobNew", "A job started.", _JOB),
        Signal("JobRemoved", "A job ended; result is done, failed or canceled (the Job "
               "object is gone after this).",
               (*_JOB, Arg("result", "s"))),
        Signal("GenerationNew", "A new generation is current.", (Arg("generation", "u"),)),
        Signal("ModuleRestored", "A device appeared whose driver was trimmed: the driver "
               "was restored (and loaded on a live system).",
               (Arg("name", "s"), Arg("modalias", "s"), Arg("generation", "u"))),
        Signal("ModuleRequested", "modprobe asked for a trimmed module (a Restore with the "
               "option on_demand, which `kmodtrim restore --on-demand` sends): it was "
               "restored and recorded as requested by modprobe; the caller loads it.",
               (Arg("name", "s"), Arg("generation", "u"))),
    ),
)

JOB = Interface(
    JOB_INTERFACE,
    f"One operation on {OBJECT_PATH}/job/ID while it runs; its properties change with "
    "PropertiesChanged.",
    methods=(
        Method("Cancel", "Ask the job to stop; it undoes its partial work unless it is past "
               "its commit point. Needs the polkit action of the job's type.",
               action=JOB_ACTION),
    ),
    properties=(
        Property("Id", "u", "The job's number."),
        Property("Type", "s", "trim, rollback, restore or kernel-install."),
        Property("Phase", "s", "The step running now (planning, stash, unlink, depmod, …, "
                 "finished)."),
        Property("Progress", "d", "From 0 to 1."),
        Property("Result", "s", "Empty while running, then done, failed or canceled."),
        Property("Error", "s", "The D-Bus error name when the job failed or was canceled."),
        Property("ErrorMessage", "s", "What went wrong, for people."),
        Property("Outcome", "a{sv}", "What the job did, once done, keyed as in `kmodtrim "
                 "apply --json` (a null value is left out); empty before."),
    ),
)

INTERFACES = (MANAGER, JOB)


def method_doc(method: Method) -> str:
    """A method's doc line, with the polkit actions it needs."""
    doc = method.doc
    if method.action not in (None, JOB_ACTION):
        doc += f" Needs uid 0 or polkit {method.action}."
    named = [o.key for o in method.options if o.key in OPTION_ACTIONS]
    if named:
        actions = sorted({OPTION_ACTIONS[k] for k in named})
        doc += (f" The options {' and '.join(named)} need uid 0 or polkit "
                f"{' or '.join(actions)}.")
    return doc


def options_doc(method: Method) -> str:
    """The doc line of a method's ``a{sv}`` argument: each key, its type and meaning."""
    parts = []
    for o in method.options:
        kind = o.signature + (f": {' | '.join(o.choices)}" if o.choices else "")
        kind += ", absolute paths" if o.key in OPTION_ACTIONS else ""
        parts.append(f"{o.key} ({kind}) {o.help}")
    return "; ".join(parts) + ". Other keys are InvalidArgs."


def _doc(parent: ET.Element, text: str) -> None:
    ET.SubElement(parent, "annotation", name=DOC_ANNOTATION, value=text)


def _args(parent: ET.Element, args: Sequence[Arg], direction: str | None,
          method: Method | None = None) -> None:
    for arg in args:
        attributes = {"name": arg.name, "type": arg.signature}
        if direction is not None:
            attributes["direction"] = direction
        element = ET.SubElement(parent, "arg", attributes)
        if method is not None and arg == _OPTIONS:
            _doc(element, options_doc(method))


def introspection_xml() -> str:
    """The contract as introspection XML with a doc annotation per interface and member
    (the text of units/org.kmodtrim.KmodTrim1.xml)."""
    node = ET.Element("node", name=OBJECT_PATH)
    _doc(node, f"kmodtrimd on the system bus as {BUS_NAME}.")
    for interface in INTERFACES:
        element = ET.SubElement(node, "interface", name=interface.name)
        _doc(element, interface.doc)
        for method in interface.methods:
            child = ET.SubElement(element, "method", name=method.name)
            _doc(child, method_doc(method))
            _args(child, method.in_args, "in", method)
            _args(child, method.out_args, "out")
        for prop in interface.properties:
            child = ET.SubElement(element, "property", name=prop.name, type=prop.signature,
                                  access="read")
            _doc(child, prop.doc)
        for sig in interface.signals:
            child = ET.SubElement(element, "signal", name=sig.name)
            _doc(child, sig.doc)
            _args(child, sig.args, None)
    ET.indent(node)
    return f"{INTROSPECT_DOCTYPE}\n{ET.tostring(node, encoding='unicode')}\n"


if __name__ == "__main__":
    sys.stdout.write(introspection_xml())
