"""The frontier loop's state file `<logging.dir>/loop_state.json`: which phases finished, when, how.

    {"version": 1, "phases": {"round_0/generate": {"status": "done", "attempts": 1, "started": "...",
                              "finished": "...", "seconds": 12.3, "command": [...], "info": {...}}, ...}}

A phase is `running` from its start until it ends `done` or `failed`; the file is rewritten atomically (temp file
+ rename) at every transition, so a loop killed at any moment leaves a readable file, and the phase it was in
stays `running` (not done): the next start of the same command runs it again. `info` holds what later phases
need (a training phase's checkpoint, a report row) and what the user may want to see (record counts).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

VERSION = 1
STATE_FILE = "loop_state.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


class LoopState:
    """The phases' records, saved to `path` after every change."""

    def __init__(self, path: str):
        self.path = path
        self.phases: Dict[str, Dict[str, Any]] = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} is not valid JSON ({exc.msg}); it is the loop's state file: delete it "
                                     "(and the round folders) to start over") from None
            if data.get("version") != VERSION:
                raise ValueError(f"{path}: state file version {data.get('version')!r}, this loop writes {VERSION}")
            self.phases = data.get("phases", {})

    def save(self) -> None:
        """Write the file atomically."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"version": VERSION, "phases": self.phases}, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, self.path)

    def done(self, name: str) -> bool:
        """Whether phase `name` finished."""
        return self.phases.get(name, {}).get("status") == "done"

    def info(self, name: str) -> Dict[str, Any]:
        """The `info` a finished phase recorded ({} when none)."""
        return self.phases.get(name, {}).get("info", {})

    def start(self, name: str, command: Optional[List[str]] = None) -> None:
        """Mark `name` running (attempts + 1) and save."""
        rec = self.phases.setdefault(name, {"attempts": 0})
        rec.update(status="running", attempts=rec.get("attempts", 0) + 1, started=_now(), command=command)
        rec.pop("finished", None)
        rec.pop("info", None)
        rec["_t0"] = time.time()
        self.save()

    def finish(self, name: str, info: Optional[Dict[str, Any]] = None) -> float:
        """Mark `name` done with `info`, save; returns its seconds."""
        rec = self.phases[name]
        seconds = round(time.time() - rec.pop("_t0", time.time()), 2)
        rec.update(status="done", finished=_now(), seconds=seconds, info=info or {})
        self.save()
        return seconds

    def fail(self, name: str, why: str) -> None:
        """Mark `name` failed with a one-line reason, save."""
        rec = self.phases[name]
        rec.pop("_t0", None)
        rec.update(status="failed", finished=_now(), error=why)
        self.save()

    def forget(self, name: str) -> None:
        """Make a finished phase unfinished (its outputs went missing, or an earlier phase was redone)."""
        if name in self.phases:
            self.phases[name]["status"] = "stale"
            self.save()
