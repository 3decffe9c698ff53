"""Chat templates: the named Jinja templates shipped in `megatron/data/templates` and a renderer.

`resolve_chat_template(name, tokenizer)` turns the `data.chat_template` setting into Jinja source
(or None for "no template"); `render_template` renders it in the same sandboxed Jinja environment
transformers uses (trim_blocks, lstrip_blocks, loop controls, `raise_exception`), so a template gives
the same text here and in `apply_chat_template`.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from megatron.config import ConfigError

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def template_names() -> List[str]:
    """Names of the shipped templates (files `templates/<name>.jinja`)."""
    return sorted(f[:-len(".jinja")] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".jinja"))


def resolve_chat_template(name: Optional[str], tokenizer_template: Optional[str]) -> Optional[str]:
    """Jinja source for `data.chat_template`.

    None or 'tokenizer' -> the tokenizer's own template (may be None); a shipped name -> that file;
    a path to a `.jinja` file -> its content. Unknown names raise ConfigError naming the key.
    """
    if name is None or name == "tokenizer":
        return tokenizer_template
    if name in template_names():
        with open(os.path.join(TEMPLATE_DIR, f"{name}.jinja"), encoding="utf-8") as fh:
            return fh.read()
    if name.endswith(".jinja") and os.path.isfile(name):
        with open(name, encoding="utf-8") as fh:
            return fh.read()
    raise ConfigError(f"key 'data.chat_template': {name!r} is not a shipped template "
                      f"({', '.join(template_names())}), 'tokenizer', or an existing .jinja file")


def compile_template(template: str):
    """Compile Jinja `template` source in a transformers-compatible sandbox; returns a jinja2 Template."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_template(template, messages: List[Dict], add_generation_prompt: bool,
                    bos_token: str = "", eos_token: str = "") -> str:
    """Render a chat template (Jinja source or a compiled Template) for `messages` ({role, content}) to text."""
    if isinstance(template, str):
        template = compile_template(template)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token)
