"""The engine: the only writer. Operations (operations.py) run transitions
(transition.py) under a typed write-ahead journal (journal.py); recovery.py finishes or
undoes one a crash interrupted; packages.py, exclusions.py and regenerate.py are the
package-manager, exclusion and depmod/initramfs steps a transition is made of."""
