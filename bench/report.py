"""The Markdown report: the Targets table first, then one section per row.

Every target the run is meant to judge is listed up front; one that no row judged reads
"not run", never "yes", so a row that was skipped (no Docker, no gcc, ``--quick``) or
failed cannot leave the table reading all "yes".
"""

from __future__ import annotations

import argparse
import enum
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import wakeproxy
from bench import plots

Row = dict[str, str]


class Status(enum.Enum):
    """A target's verdict; the value is what the table's "met" column shows."""

    MET = "yes"
    NOT_MET = "**no**"
    NOT_RUN = "**not run**"


@dataclass(frozen=True)
class Target:
    figure: str
    goal: str


def version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0]


class Report:
    def __init__(self, out: Path, targets: Sequence[Target]) -> None:
        self.sections: list[str] = []
        self.plots = out.parent / "plots"
        self.expected = list(targets)
        # target -> (measured, status), filled as rows are judged or skipped.
        self.verdicts: dict[Target, tuple[str, Status]] = {}
        # Figures a target is judged on across rows (name -> value), as rows add them.
        self.figures: dict[str, float] = {}

    def judge(self, target: Target, measured: str, met: bool) -> None:
        self.verdicts[target] = (measured, Status.MET if met else Status.NOT_MET)

    def not_run(self, target: Target, why: str) -> None:
        self.verdicts[target] = (f"not run: {why}", Status.NOT_RUN)

    def verdict(self, target: Target) -> tuple[str, Status]:
        return self.verdicts.get(target, ("not run: no row judged it", Status.NOT_RUN))

    def targets(self) -> list[Target]:
        """The expected targets in row order, then any judged that were not expected."""
        return self.expected + [t for t in self.verdicts if t not in self.expected]

    def all_met(self) -> bool:
        # A report that judged nothing has met nothing.
        listed = self.targets()
        return bool(listed) and all(self.verdict(t)[1] is Status.MET for t in listed)

    def summary(self) -> str:
        statuses = [self.verdict(t)[1] for t in self.targets()]
        if self.all_met():
            return f"**All {len(statuses)} targets met.**"
        met, not_met, not_run = (statuses.count(s) for s in Status)
        return (
            f"**Not all targets met: {met} met, {not_met} not met, {not_run} not run "
            f"(of {len(statuses)}).**"
        )

    def targets_section(self) -> str:
        lines = ["## Targets", "", self.summary(), ""]
        lines += ["| figure | target | measured | met |", "|---|---|---|---|"]
        for target in self.targets():
            measured, status = self.verdict(target)
            lines.append(f"| {target.figure} | {target.goal} | {measured} | {status.value} |")
        if any(self.verdict(t)[1] is Status.NOT_MET for t in self.targets()):
            lines += [
                "",
                "What holds the rows marked **no** back, profiled: [PROFILES.md](PROFILES.md).",
            ]
        return "\n".join(lines) + "\n"

    def plot(self, name: str, title: str, draw: Callable[[Path], None]) -> None:
        """Draw a PNG next to the report and link it from the last section."""
        if not plots.available():
            self.sections.append(
                "(No plot: matplotlib is not installed; `pip install -e .[bench]`.)\n"
            )
            return
        self.plots.mkdir(parents=True, exist_ok=True)
        draw(self.plots / name)
        self.sections.append(f"![{title}](plots/{name})\n")

    def table(self, title: str, note: str, commands: list[str], rows: list[Row]) -> None:
        head = list(rows[0])
        lines = [f"## {title}", "", note, ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row[h] for h in head) + " |" for row in rows]
        lines += ["", "Commands:", "", "```", *commands, "```", ""]
        self.sections.append("\n".join(lines))
        print("\n".join(lines))

    def write(self, path: Path, args: argparse.Namespace) -> None:
        header = [
            "# wakeproxy benchmark results",
            "",
            f"Produced by `{shlex.join(['python', '-m', 'bench', *sys.argv[1:]])}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"- machine: {platform.machine()}, {subprocess.getoutput('nproc')} cores, "
            f"{platform.platform()}",
            f"- Python {platform.python_version()}, wakeproxy {wakeproxy.__version__}",
            f"- {version(['haproxy', '-v'])}",
            f"- {version(['nginx', '-v'])}; {version(['wrk', '--version'])}; "
            f"{version(['iperf3', '--version'])}",
            f"- rounds per contender: {args.rounds}, {args.seconds:g} s each; contenders "
            "alternate order each round; figures are medians; ratios are to HAProxy "
            "in the same run.",
            "",
        ]
        body = "\n".join([self.targets_section(), *self.sections])
        path.write_text("\n".join(header) + "\n" + body)
