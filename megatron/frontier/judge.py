"""LLM-judge prompts and grade parsing: a template file renders the judge's prompt, a regex reads its grade.

A template file is YAML (the shipped one: `judge_template.yml` next to this module):

    template: |            # the judge's prompt; {prompt} and {response} are replaced (other braces stay)
      ...{prompt}...{response}...
    grade_regex: 'Grade:\\s*(\\d+)'   # the first match's group 1 (or the whole match) must read as a number
    min_grade: 1           # optional bounds: a grade outside [min_grade, max_grade] is unparseable
    max_grade: 10
    chat: true             # send the prompt as a user turn through the judge's chat template (when it has one)

`parse_grade` never guesses: an answer without a match, with a match that is not a number, or with a number out
of bounds gives (None, reason), and the caller counts it and leaves the score null.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import yaml

SHIPPED_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge_template.yml")
NO_MATCH, NOT_A_NUMBER, OUT_OF_RANGE = "no_match", "not_a_number", "out_of_range"
PARSE_FAILURES = {
    NO_MATCH: "no grade found (grade_regex did not match)",
    NOT_A_NUMBER: "grade is not a number",
    OUT_OF_RANGE: "grade outside [min_grade, max_grade]",
}
_KEYS = ("template", "grade_regex", "min_grade", "max_grade", "chat")


@dataclass(frozen=True)
class JudgeTemplate:
    """A judge's prompt template and grade parser (see the module docstring)."""
    template: str
    grade_regex: str
    min_grade: Optional[float] = None
    max_grade: Optional[float] = None
    chat: bool = True
    path: str = ""

    def render(self, prompt: str, response: str) -> str:
        """The judge's prompt text for one (prompt, response) pair (str.replace: other braces are left alone)."""
        return self.template.replace("{prompt}", prompt).replace("{response}", response)

    def parse(self, answer: str) -> Tuple[Optional[float], Optional[str]]:
        """(grade, None) for a parseable judge answer, else (None, one of NO_MATCH, NOT_A_NUMBER, OUT_OF_RANGE)."""
        match = re.search(self.grade_regex, answer)
        if match is None:
            return None, NO_MATCH
        text = match.group(1) if match.groups() else match.group(0)
        try:
            grade = float(text)
        except (TypeError, ValueError):
            return None, NOT_A_NUMBER
        if not math.isfinite(grade):
            return None, NOT_A_NUMBER
        if (self.min_grade is not None and grade < self.min_grade) or \
                (self.max_grade is not None and grade > self.max_grade):
            return None, OUT_OF_RANGE
        return grade, None


def load_judge_template(path: Optional[str] = None, key: str = "score.judge_template") -> JudgeTemplate:
    """The JudgeTemplate of YAML file `path` (default: the shipped one). ValueError naming the file and key for a
    missing file, an unknown key, a template without {response}, or a regex that does not compile."""
    path = path or SHIPPED_TEMPLATE
    if not os.path.isfile(path):
        raise ValueError(f"key '{key}': judge template file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a judge template file is a YAML mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(_KEYS)}")
    for name in ("template", "grade_regex"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise ValueError(f"{path}: '{name}' must be a non-empty string")
    if "{response}" not in data["template"]:
        raise ValueError(f"{path}: 'template' never mentions {{response}}, so the judge would not see the answer")
    try:
        re.compile(data["grade_regex"])
    except re.error as exc:
        raise ValueError(f"{path}: 'grade_regex' does not compile: {exc}") from None
    bounds = {}
    for name in ("min_grade", "max_grade"):
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: '{name}' must be a number, got {value!r}")
        bounds[name] = None if value is None else float(value)
    chat = data.get("chat", True)
    if not isinstance(chat, bool):
        raise ValueError(f"{path}: 'chat' must be true or false, got {chat!r}")
    return JudgeTemplate(data["template"], data["grade_regex"], bounds["min_grade"], bounds["max_grade"], chat,
                         os.path.abspath(path))
