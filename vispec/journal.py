"""Append-only JSON-lines journals: what a long job has finished, kept so that a stopped or killed run
resumes where it stopped and its finished parts survive (small enough to commit where a session's
disk does not outlive it).

The first line is ``{"config": ...}``, the settings the entries were made under; opening a journal
under other settings is refused, naming what differs (its entries would silently belong to another
run). Each further line is one entry, a JSON object keyed by ``key_field``. A line cut by an
interruption is dropped when the journal is opened (its unit is simply done again).
"""
from __future__ import annotations

import json
from pathlib import Path


class Journal:
    def __init__(self, path, config: dict, key_field: str = "key"):
        self.path = Path(path)
        self.key_field = key_field
        self.config = json.loads(json.dumps(config))  # as it reads back (tuples become lists)
        self.entries: dict[str, dict] = {}
        text = self.path.read_text() if self.path.is_file() else ""
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            self.path.write_text(text)
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"config": self.config}) + "\n")
            return
        head = json.loads(lines[0])
        if not isinstance(head, dict) or "config" not in head:
            raise ValueError(f"{self.path}: the first line must be {{\"config\": ...}} (the settings of its "
                             f"entries); it is {lines[0][:80]!r}")
        if head["config"] != self.config:
            keys = sorted(set(head["config"]) | set(self.config))
            diff = {k: (head["config"].get(k), self.config.get(k)) for k in keys
                    if head["config"].get(k) != self.config.get(k)}
            raise ValueError(f"{self.path} was written under other settings (stored, now): {diff}; use another "
                             "file, or the settings it was written with")
        for line in lines[1:]:
            x = json.loads(line)
            self.entries[str(x[key_field])] = x

    def __contains__(self, key: str) -> bool:
        return str(key) in self.entries

    def __getitem__(self, key: str) -> dict:
        return self.entries[str(key)]

    def add(self, entries: list[dict]) -> None:
        """Appends the entries whose keys it does not hold yet (one write: a batch is kept or redone whole)."""
        new = [e for e in entries if str(e[self.key_field]) not in self.entries]
        if not new:
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in new))
        self.entries.update({str(e[self.key_field]): e for e in new})
