"""The report of ``dsft doctor``: finding levels, exit codes, and how a report is printed (lines or ``--json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


@dataclass
class Finding:
    """One line of the report.

    Attributes:
        level: ``OK``, ``WARN``, ``FAIL`` or ``SKIP`` (the check could not run here; says why).
        check: short name of what was checked (``data.tokenizer``, ``overfit``, ``divergence`` ...).
        message: what was found, with the numbers.
        fix: what to do (empty for OK).
    """

    level: str
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        """``LEVEL check: message. Fix: ...`` on one line (newlines in a rendered sample are shown as \\n)."""
        text = f"{self.level:<4} {self.check}: {self.message}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return text.replace("\n", "\\n")


@dataclass
class Report:
    """Everything one doctor run found, plus the measurements behind it (``--json``)."""

    mode: str  # "config" (before training) or "run" (after)
    target: str
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, level: str, check: str, message: str, fix: str = "") -> Finding:
        """Append a finding and return it (a later check may still change its level, e.g. ``lr``)."""
        finding = Finding(level, check, message, fix)
        self.findings.append(finding)
        return finding

    def level_of(self, check: str) -> str | None:
        """The level of the last finding named ``check`` (None when it was not reported)."""
        return next((f.level for f in reversed(self.findings) if f.check == check), None)

    @property
    def exit_code(self) -> int:
        """1 when any finding is FAIL, else 0."""
        return EXIT_PROBLEM if any(f.level == FAIL for f in self.findings) else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object: mode, target, exit code, the findings, then the measurements (``details``)."""
        return {
            "mode": self.mode,
            "target": self.target,
            "exit_code": self.exit_code,
            "findings": [asdict(f) for f in self.findings],
            **self.details,
        }


def print_report(report: Report, as_json: bool = False) -> None:
    """Print ``report`` to stdout: one line per finding and a verdict line, or (``as_json``) one JSON object.

    Args:
        report: what one doctor run found.
        as_json: print ``report.to_dict()`` instead of lines.
    """
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return
    for f in report.findings:
        print(f.line())
    fails = sum(f.level == FAIL for f in report.findings)
    warns = sum(f.level == WARN for f in report.findings)
    verdict = "healthy" if not fails else "problems found"
    print(f"doctor: {verdict}: {fails} FAIL, {warns} WARN ({report.target})")
