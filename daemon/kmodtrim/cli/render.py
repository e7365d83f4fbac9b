"""Human output of the documents the use cases answer with (usecases.py) — the same
renderer whether this process computed a document or kmodtrimd did. Header rows, human
sizes, no raw JSON (``--json`` prints the document itself)."""

from __future__ import annotations

from collections import Counter
from typing import Any, TextIO

from ..sizes import human_bytes
from .jsonout import dumps_indented

TOP_SAVINGS = 15




def dump(doc: Any, out: TextIO) -> None:
    """The document as indented JSON (as json.dumps writes it; see jsonout.py), in one
    write (json.dump writes each token: ~10⁵ writes for a plan)."""
    out.write(dumps_indented(doc) + "\n")


def plan(doc: dict[str, Any], out: TextIO, show_all: bool) -> list[str]:
    """Print a plan document; returns its warnings (the caller puts them on stderr)."""
    totals = doc["totals"]
    total = doc["total_bytes"] or 1
    print(f"kernel {doc['kernel']} (root {doc['root']})", file=out)
    print(f"  keep   {totals['keep_modules']:5d} modules  {human_bytes(doc['keep_bytes']):>10}",
          file=out)
    print(f"  remove {totals['remove_modules']:5d} modules  "
          f"{human_bytes(doc['remove_bytes']):>10}  "
          f"({100 * doc['remove_bytes'] / total:.1f}% of {human_bytes(doc['total_bytes'])})",
          file=out)
    if doc["firmware_remove"]:
        print(f"  firmware: remove {totals['firmware_remove_files']} files "
              f"({human_bytes(totals['firmware_remove_bytes'])})", file=out)
    sources = doc.get("sources")
    if sources and sources["local_files"] + sources["archive_files"]:
        _sources(sources, out)
    roots: Counter[str] = Counter()
    for m in doc["keep"]:
        first = m["reasons"][0]
        roots[first["kind"] if first["via"] is None else "dependency"] += 1
    print("  kept because: " + ", ".join(f"{k} {n}" for k, n in roots.most_common()), file=out)
    platform = doc.get("platform")
    if platform is not None:
        names = ", ".join(platform["names"]) or "none"
        print(f"  platform drivers kept for: {names} ({platform['source']})", file=out)
    if doc["unresolved_symbols"]:
        print(f"  SYMBOL CHECK FAILED: {len(doc['unresolved_symbols'])} unresolved symbols",
              file=out)
    else:
        print("  symbol check: every kept module's symbols resolve "
              f"(kernel exports: {doc['kernel_exports_source']})", file=out)
    biggest = sorted(doc["remove"], key=lambda m: int(m["size"]), reverse=True)
    shown = biggest if show_all else biggest[:TOP_SAVINGS]
    if shown:
        print(f"\n{'biggest savings' if not show_all else 'remove'}:", file=out)
        for r in shown:
            print(f"  {human_bytes(r['size']):>10}  {r['name']}", file=out)
        if len(biggest) > len(shown):
            print(f"  … and {len(biggest) - len(shown)} more (--all lists them)", file=out)
    if show_all:
        print("\nkeep:", file=out)
        for k in doc["keep"]:
            print(f"  {human_bytes(k['size']):>10}  {k['name']}: {k['reasons'][0]['text']}",
                  file=out)
    return list(doc["warnings"])


def plan_summary(doc: dict[str, Any]) -> str:
    """One line before a trim is confirmed, like apt's."""
    sources = doc.get("sources")
    if not sources:  # a plan from an older kmodtrimd
        return (f"remove {doc['totals']['remove_modules']:,} modules from kernel "
                f"{doc['kernel']}, {human_bytes(doc['remove_bytes'])} out of the tree "
                f"(keep {doc['totals']['keep_modules']:,}, {human_bytes(doc['keep_bytes'])})")
    return (f"remove {doc['totals']['remove_modules']:,} modules from kernel {doc['kernel']}, "
            f"frees {_net(sources)} net of the stash "
            f"({human_bytes(sources['tree_bytes_out'])} out of the tree, at most "
            f"{human_bytes(sources['local_bytes'])} kept locally)")


def _net(sources: dict[str, Any]) -> str:
    """The bytes a trim frees net of the stash, as far as a plan knows: the stash
    compresses the uncompressed files it keeps, so with local copies that is a floor."""
    net = human_bytes(sources["net_freed_bytes"])
    return f"at least {net}" if sources["local_bytes"] else net


def _sources(sources: dict[str, Any], out: TextIO) -> None:
    print(f"  come back from: the archive {sources['archive_files']} files "
          f"({human_bytes(sources['archive_bytes'])}), the stash {sources['local_files']} "
          f"files ({human_bytes(sources['local_bytes'])} before compression; [stash] keep = "
          f"\"{sources['keep']}\"); frees {_net(sources)} net", file=out)


def outcome(doc: dict[str, Any], out: TextIO, *, quiet: bool = False) -> list[str]:
    """Print what a change verb did (or would do); returns warnings for stderr."""
    taken, back = doc.get("taken_out", doc.get("stash", [])), \
        doc.get("put_back", doc.get("restore", []))
    verb = "would take" if doc.get("dry_run") else "took"
    if not quiet or doc.get("dry_run"):
        print(f"{verb} out {len(taken)} files and put back {len(back)}", file=out)
    if doc.get("dry_run"):
        for path in taken[:20]:
            print(f"  - {path}", file=out)
        for path in back[:20]:
            print(f"  + {path}", file=out)
        more = len(taken) + len(back) - 40
        if more > 0:
            print(f"  … {more} more (--json lists all)", file=out)
    for note in doc.get("notes", []):
        print(note, file=out)
    if doc.get("generation") is not None:
        print(f"generation {doc['generation']}: {doc.get('description') or ''}".rstrip(": "),
              file=out)
        if doc.get("removed_files") is not None:
            stash = doc.get("stash_bytes_on_disk")
            print(f"out of the tree now: {doc['removed_files']} files "
                  f"({human_bytes(doc['removed_bytes'])})"
                  + (f"; stash on disk {human_bytes(stash)}" if stash is not None else ""),
                  file=out)
        for kernel, entry in (doc.get("regen") or {}).items():
            initramfs = entry.get("initramfs") or {}
            state = initramfs.get("image") or initramfs.get("skipped") or "skipped"
            print(f"kernel {kernel}: depmod done, initramfs: {state}", file=out)
    if "net_freed_bytes" in doc and (doc.get("generation") is not None or doc.get("dry_run")):
        grew, net = doc["stash_growth_bytes"], doc["net_freed_bytes"]
        verb = ("would free" if net >= 0 else "would take") if doc.get("dry_run") else (
            "freed" if net >= 0 else "took")
        print(f"{verb} "
              f"{human_bytes(abs(net))} {'net of' if net >= 0 else 'more disk with'} the stash "
              f"({human_bytes(doc['tree_bytes_out'])} out of the tree, "
              f"{human_bytes(doc['tree_bytes_in'])} back in, stash "
              f"{'+' if grew >= 0 else '-'}{human_bytes(abs(grew))}"
              + (f", /boot +{human_bytes(doc['boot_growth_bytes'])} until the new initramfs "
                 "has booted" if doc.get("boot_growth_bytes", 0) > 0 else "") + ")", file=out)
    return [f"not put back: {line}" for line in doc.get("damaged", [])]


def history(doc: dict[str, Any], out: TextIO) -> None:
    print(f"  {'GEN':>4}  {'CREATED':24}  {'ACTION':9}  {'FILES OUT':>9}  {'SIZE':>10}  "
          "DESCRIPTION", file=out)
    for g in doc["generations"]:
        mark = "*" if g["current"] else " "
        print(f"{mark} {g['generation']:4d}  {g['created'] or '-':24}  {g['action']:9}  "
              f"{g['removed_files']:9d}  {human_bytes(g['removed_bytes']):>10}  "
              f"{g['description']}", file=out)


def show(doc: dict[str, Any], out: TextIO) -> None:
    print(f"generation {doc['generation']} ({doc['action']}, "
          f"{doc['created'] or 'as installed'}): {doc['description']}", file=out)
    print(f"  out of the tree: {doc['removed_files']} files, "
          f"{human_bytes(doc['removed_bytes'])}", file=out)
    for title, rows in (("took out", doc["taken_out"]), ("put back", doc["put_back"])):
        if not rows:
            continue
        modules = sorted({r["module"] for r in rows if r["kind"] == "module" and r["module"]})
        firmware = [r["path"] for r in rows if r["kind"] == "firmware"]
        print(f"  {title} {len(rows)} files: {len(modules)} modules, "
              f"{len(firmware)} firmware files", file=out)
        if modules:
            print("    modules: " + ", ".join(modules[:40])
                  + (f" … and {len(modules) - 40} more" if len(modules) > 40 else ""),
                  file=out)
        for path in firmware[:10]:
            print(f"    firmware: {path}", file=out)
    for verb, names in (("removed", doc["packages_removed"]),
                        ("reinstalled", doc["packages_reinstalled"])):
        if names:
            print(f"  this generation {verb} package(s): {', '.join(names)}", file=out)
    for p in doc["packages_out"]:
        print(f"  package out of the system: {p['name']} {p['version']} ({p['files']} files "
              "in the stash)", file=out)
    for kernel, entry in doc["regen"].items():
        initramfs = (entry.get("initramfs") or {})
        print(f"  kernel {kernel}: depmod {entry.get('depmod_seconds', '?')} s, initramfs "
              f"{initramfs.get('image') or initramfs.get('skipped') or 'not regenerated'}",
              file=out)


def status(doc: dict[str, Any], out: TextIO) -> None:
    print(f"generation {doc['generation']}: {doc['description']}", file=out)
    print(f"  {doc['removed_files']} files ({human_bytes(doc['removed_bytes'])}) out of the "
          f"tree, stash {human_bytes(doc['stash_bytes_on_disk'])} on disk", file=out)
    if "net_freed_bytes" in doc:
        print(f"  net freed {human_bytes(doc['net_freed_bytes'])}; "
              f"{doc['from_archive_files']} of the files come back from the package archive",
              file=out)
    if doc.get("boot_kept_bytes"):
        print(f"  /boot keeps {human_bytes(doc['boot_kept_bytes'])} of previous initramfs "
              "images until the new ones have booted (counted against the bytes freed)",
              file=out)
    daemon = {True: "running", False: "not running", None: "- (image root)"}[
        doc["daemon_running"]]
    print(f"  kernel {doc['kernel'] or '-'}, mode {doc['mode']}, kmodtrimd {daemon}", file=out)
    seen = doc["observation"]
    state = "met" if seen["met"] else "not yet met"
    print(f"  observed boots: {seen['boots']} over {seen['days']:g} day(s); the policy asks "
          f"for {seen['boots_needed']} boots and {seen['days_needed']:g} days ({state})",
          file=out)
    if doc["restored_modules"]:
        print("  kept for having been restored: " + ", ".join(doc["restored_modules"]),
              file=out)
    if doc["pending"]:
        print(f"  PENDING: {doc['pending']}", file=out)
    for problem in doc["problems"]:
        print(f"  problem: {problem}", file=out)
    damaged = doc["damaged"]
    if damaged:
        print(f"  DAMAGED: {len(damaged)} stash cop{'y' if len(damaged) == 1 else 'ies'} "
              "cannot be restored:", file=out)
        for line in damaged[:20]:
            print(f"    {line}", file=out)
        if len(damaged) > 20:
            print(f"    … and {len(damaged) - 20} more (--json lists all)", file=out)
    elif doc["verified"]:
        print("  every stash copy verified", file=out)
