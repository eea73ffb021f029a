"""Tool calls, Hermes style (as vLLM's and SGLang's `hermes` parser): the chat template shows the
tools, the model answers `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and the
server turns that into OpenAI's `tool_calls`, whole or streamed.

`tool_choice`: "none" shows no tools and parses nothing; "auto" shows them and parses what the
model writes; "required" and a named function also decode under a grammar (engine/grammar.py),
so the answer is always one or more calls (one for a named function, or with
`parallel_tool_calls: false`) whose arguments match the function's parameters.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from engine.params import Constraint

from . import errors

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict]           # what the template shows (OpenAI's shape); [] for none
    parse: bool                 # turn <tool_call> blocks into tool_calls
    constraint: Constraint | None


def plan_tools(body, renders_tools: bool) -> ToolPlan:
    """What a chat request's `tools`, `tool_choice` and `parallel_tool_calls` ask for."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise errors.APIError(400, "tool_choice must be none, auto, required or a named function",
                              param="tool_choice", code="invalid_value")
    if choice != "none" and not tools:
        raise errors.APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if choice == "none":
        return ToolPlan([], False, None)
    if not renders_tools:
        raise errors.APIError(400, "this model's chat template does not render tools", param="tools",
                              code="tools_unsupported")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if isinstance(choice, str):
        chosen, many = (list(functions.values()), body.parallel_tool_calls) if choice == "required" else (None, False)
    else:
        name = choice.function.name
        if name not in functions:
            raise errors.APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                                  param="tool_choice", code="invalid_value")
        chosen, many = [functions[name]], False
    return ToolPlan(tools, True, calls_grammar(chosen, many) if chosen else None)


def calls_grammar(functions: list[dict], many: bool) -> Constraint:
    """A Lark grammar: one call (or one or more) to one of `functions`, with valid arguments."""
    call_schema = {"oneOf": [{
        "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
        "properties": {"name": {"const": f["name"]},
                       "arguments": f.get("parameters") or {"type": "object", "properties": {}}}}
        for f in functions]}
    repeat = "(\"\\n\" call)*" if many else ""
    lark = (f"start: call {repeat}\n"
            f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps(call_schema)}\n")
    return Constraint("lark", lark)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def tool_call(raw: str, index: int) -> dict | None:
    """One `<tool_call>` body as OpenAI's tool_call; None if it is not a call."""
    try:
        call = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {"index": index, "id": new_call_id(), "type": "function",
            "function": {"name": call["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """The text and the tool calls of a whole answer; a block that is not a call stays text."""
    calls, kept, last = [], [], 0
    for match in CALL.finditer(text):
        call = tool_call(match.group(1), len(calls))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


@dataclass
class StreamingToolParser:
    """Splits streamed text into content deltas and whole tool calls: text is held back while it
    could still be the start of `<tool_call>`, and a call is sent once its `</tool_call>` arrives."""
    pending: str = ""
    in_call: bool = False
    calls: list[dict] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    return content, calls
                call = tool_call(self.pending[:end].strip(), len(self.calls))
                if call is not None:
                    self.calls.append(call)
                    calls.append(call)
                else:
                    content += OPEN + self.pending[:end + len(CLOSE)]
                self.pending, self.in_call = self.pending[end + len(CLOSE):].lstrip("\n"), False
                continue
            start = self.pending.find(OPEN)
            if start >= 0:
                content += self.pending[:start]
                self.pending, self.in_call = self.pending[start + len(OPEN):], True
                continue
            keep = partial_prefix(self.pending, OPEN)
            content += self.pending[:len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
            return content, calls

    def finish(self) -> str:
        """What is left at the end (an unfinished call is text after all)."""
        rest = (OPEN if self.in_call else "") + self.pending
        self.pending, self.in_call = "", False
        return rest


def partial_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
