"""What a benchmark script reports: lines printed as they come and, with `--markdown PATH`, written to a
Markdown file at the end, which the documentation includes as it is (so no figure there is typed by hand)."""

from __future__ import annotations

from pathlib import Path

from frozenlm.files import write_atomically


class Report:
    """`line(text)` prints and keeps `text`; `save()` writes the kept lines to `path` (if any)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.lines = path, []

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self) -> None:
        if self.path is not None:
            write_atomically(self.path, "\n".join(self.lines).strip() + "\n")
            print(f"wrote {self.path}")
