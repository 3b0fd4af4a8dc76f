"""How the reports write what they found: a table as Markdown, CSV and LaTeX, its cells and intervals as text, and
names made safe for files."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """Rows of plain values; `columns` fixes their order. Written as Markdown, CSV and LaTeX."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    note: str = ""

    def cell(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for r in self.rows:
            lines.append("| " + " | ".join(self.cell(r.get(c)).replace("|", "\\|") for c in self.columns) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: ("" if r.get(c) is None or (isinstance(r.get(c), float) and math.isnan(r[c])) else
                            (round(r[c], 6) if isinstance(r.get(c), float) else r.get(c))) for c in self.columns})
        return buf.getvalue()

    def to_latex(self) -> str:
        lines = [r"\begin{tabular}{" + "l" * len(self.columns) + "}", r"\toprule",
                 " & ".join(latex_escape(c) for c in self.columns) + r" \\", r"\midrule"]
        for r in self.rows:
            lines.append(" & ".join(latex_escape(self.cell(r.get(c))) for c in self.columns) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def write(self, out: Path, stem: str) -> list[Path]:
        files = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.tex"]
        md = f"# {self.title}\n\n" + (f"{self.note}\n\n" if self.note else "") + self.to_markdown()
        files[0].write_text(md, encoding="utf-8")
        files[1].write_text(self.to_csv(), encoding="utf-8")
        files[2].write_text(self.to_latex(), encoding="utf-8")
        return files


def latex_escape(s: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(repl.get(ch, ch) for ch in s)


def fmt_ci(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "-"
    return f"[{round(lo, 2) + 0.0:.2f}, {round(hi, 2) + 0.0:.2f}]"  # + 0.0: never "-0.00"


def slug(s: str, fallback: str = "x", strip: str = "-") -> str:
    """`s` as a file name: each run of characters other than letters, digits, `_`, `.` and `-` becomes one `-`, the
    `strip` characters are taken off both ends, and `fallback` stands for an empty result."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip(strip) or fallback
