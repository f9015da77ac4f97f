"""What one ``fedsynth-site doctor`` check reports: :class:`Check` and its two shortcuts.

The runner (:mod:`client.doctor.run`) and the check modules (:mod:`client.doctor.site`,
:mod:`client.doctor.federation`, :mod:`client.doctor.deploy`) all speak this type;
it lives apart from the runner so that the check modules need not import the
module that calls them. A check carries no site data beyond what it prints to
the local operator: nothing here leaves the site.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One prerequisite: ``ok`` False means a round would fail; ``fix`` says what to do.

    An ``ok`` check may carry ``warning=True`` when the site can run but an
    operator should look (a CPU-only host, unsigned reports, notes readable by
    other accounts, plain train rounds allowed).
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False


def fail_check(name: str, detail: str, fix: str) -> Check:
    """A failed check: a round would fail until ``fix`` is done."""
    return Check(name, False, detail, fix)


def warn_check(name: str, detail: str, fix: str) -> Check:
    """A passing check an operator should still look at (``fix`` says what to do)."""
    return Check(name, True, detail, fix, warning=True)
