"""An evaluator for the subset of Go's text/template that Ollama chat templates use.

It exists to verify our Modelfile TEMPLATEs without Go: the templates we write are rendered here
and compared with the model's own Jinja rendering. It covers text and `{{- … -}}` trimming,
`if` / `else if` / `else`, `range` (with `$i, $x :=`), `continue`, variables (`:=`, `=`), fields
(`.Role`, `$.System`, `$x.Content`), string/number literals with Go escapes, parentheses and the
functions eq, ne, and, or, not, len, slice and printf (%s, %d, %v). Anything else raises
GoTemplateError, so a template we cannot evaluate is never reported as verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    """The template uses syntax outside the supported subset, or is malformed."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|`[^`]*`|\(|\)|:=|=|,|[^\s(),=]+)')


@dataclass
class _Node:
    kind: str  # text, output, if, range, assign, declare, continue
    text: str = ""
    expr: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)
    branches: list[tuple[list[str], list[_Node]]] = field(default_factory=list)
    otherwise: list[_Node] = field(default_factory=list)


class _Continue(Exception):
    pass


def _tokens(source: str) -> list[str]:
    tokens, position = [], 0
    source = source.strip()
    while position < len(source):
        match = _TOKEN.match(source, position)
        if not match:
            raise GoTemplateError(f"cannot read {source[position:]!r}")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


def _lex(template: str) -> list[tuple[str, str]]:
    """("text", literal) and ("action", inner) pieces, with trim markers applied."""
    pieces: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(template):
        text = template[position : match.start()]
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        pieces.append(("text", text))
        pieces.append(("action", match.group(2)))
        position = match.end()
        if match.group(3):
            rest = template[position:]
            position += len(rest) - len(rest.lstrip(" \t\r\n"))
    pieces.append(("text", template[position:]))
    return [p for p in pieces if p != ("text", "")]


def parse(template: str) -> list[_Node]:
    """Parse a template into a tree; raises GoTemplateError outside the supported subset."""
    pieces = _lex(template)
    nodes, end = _parse_block(pieces, 0, top=True)
    return nodes


def _parse_block(pieces: list[tuple[str, str]], index: int, top: bool = False) -> tuple[list[_Node], int]:
    nodes: list[_Node] = []
    while index < len(pieces):
        kind, value = pieces[index]
        if kind == "text":
            nodes.append(_Node("text", text=value))
            index += 1
            continue
        tokens = _tokens(value)
        if not tokens or tokens[0].startswith("/*"):
            index += 1
            continue
        head = tokens[0]
        if head in ("end", "else"):
            if top:
                raise GoTemplateError(f"unexpected {{{{ {value.strip()} }}}}")
            return nodes, index
        if head == "if":
            node = _Node("if")
            condition = tokens[1:]
            while True:
                body, index = _parse_block(pieces, index + 1)
                node.branches.append((condition, body))
                closing = _tokens(pieces[index][1]) if index < len(pieces) else []
                if not closing:
                    raise GoTemplateError("{{ if }} without {{ end }}")
                if closing[0] == "end":
                    break
                if closing[:2] == ["else", "if"]:
                    condition = closing[2:]
                    continue
                node.otherwise, index = _parse_block(pieces, index + 1)
                if index >= len(pieces) or _tokens(pieces[index][1])[0] != "end":
                    raise GoTemplateError("{{ else }} without {{ end }}")
                break
            nodes.append(node)
            index += 1
        elif head == "range":
            node = _Node("range")
            rest = tokens[1:]
            if ":=" in rest:
                split = rest.index(":=")
                node.names = [t for t in rest[:split] if t != ","]
                rest = rest[split + 1 :]
            node.expr = rest
            node.body, index = _parse_block(pieces, index + 1)
            if index >= len(pieces) or _tokens(pieces[index][1])[0] != "end":
                raise GoTemplateError("{{ range }} without {{ end }}")
            nodes.append(node)
            index += 1
        elif head == "continue":
            nodes.append(_Node("continue"))
            index += 1
        elif head.startswith("$") and len(tokens) > 2 and tokens[1] in (":=", "="):
            nodes.append(_Node("declare" if tokens[1] == ":=" else "assign", names=[head], expr=tokens[2:]))
            index += 1
        elif head in ("with", "define", "template", "block", "break"):
            raise GoTemplateError(f"{{{{ {head} }}}} is outside the supported subset")
        else:
            nodes.append(_Node("output", expr=tokens))
            index += 1
    if not top:
        raise GoTemplateError("a block is never closed with {{ end }}")
    return nodes, index


def _truthy(value: Any) -> bool:
    return bool(value)


def _literal(token: str) -> Any:
    if token.startswith("`"):
        return token[1:-1]
    if token.startswith('"'):
        escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
        return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), token[1:-1])
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token in ("true", "false"):
        return token == "true"
    if token == "nil":
        return None
    raise GoTemplateError(f"unknown token {token!r}")


def _field(value: Any, path: list[str]) -> Any:
    for name in path:
        if value is None:
            return None
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


def _printf(fmt: str, *args: Any) -> str:
    return re.sub(r"%[sdv]", "{}", fmt.replace("{", "{{").replace("}", "}}")).format(*args)


_FUNCTIONS: dict[str, Any] = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "len": lambda a: len(a or ()),
    "slice": lambda a, *ix: a[ix[0] : ix[1]] if len(ix) > 1 else a[ix[0] if ix else 0 :],
    "printf": _printf,
}


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def set(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"assignment to undeclared variable {name}")


def _operand(token: str, dot: Any, scope: _Scope) -> Any:
    if token == ".":
        return dot
    if token.startswith("."):
        return _field(dot, token[1:].split("."))
    if token.startswith("$"):
        name, _, path = token.partition(".")
        return _field(scope.get(name), path.split(".") if path else [])
    return _literal(token)


def _evaluate(tokens: list[str], dot: Any, scope: _Scope) -> Any:
    values, index = _arguments(tokens, 0, dot, scope)
    if index != len(tokens):
        raise GoTemplateError(f"cannot evaluate {' '.join(tokens)!r}")
    return values


def _arguments(tokens: list[str], index: int, dot: Any, scope: _Scope) -> tuple[Any, int]:
    """Evaluate one command (function call or operand) starting at index, up to ')' or the end."""
    if index >= len(tokens):
        raise GoTemplateError("empty expression")
    head = tokens[index]
    if head in ("and", "or") or head in _FUNCTIONS:
        args: list[Any] = []
        index += 1
        while index < len(tokens) and tokens[index] != ")":
            value, index = _single(tokens, index, dot, scope)
            args.append(value)
        if head == "and":
            result = next((a for a in args if not _truthy(a)), args[-1] if args else None)
        elif head == "or":
            result = next((a for a in args if _truthy(a)), args[-1] if args else None)
        else:
            result = _FUNCTIONS[head](*args)
        return result, index
    value, index = _single(tokens, index, dot, scope)
    return value, index


def _single(tokens: list[str], index: int, dot: Any, scope: _Scope) -> tuple[Any, int]:
    token = tokens[index]
    if token == "(":
        value, index = _arguments(tokens, index + 1, dot, scope)
        if index >= len(tokens) or tokens[index] != ")":
            raise GoTemplateError("unbalanced parentheses")
        return value, index + 1
    if token in _FUNCTIONS or token in ("and", "or"):
        raise GoTemplateError(f"function {token} used as a value without parentheses")
    return _operand(token, dot, scope), index + 1


def _run(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "output":
            value = _evaluate(node.expr, dot, scope)
            out.append("" if value is None else str(value))
        elif node.kind == "declare":
            scope.frames[-1][node.names[0]] = _evaluate(node.expr, dot, scope)
        elif node.kind == "assign":
            scope.set(node.names[0], _evaluate(node.expr, dot, scope))
        elif node.kind == "continue":
            raise _Continue
        elif node.kind == "if":
            for condition, body in node.branches:
                if _truthy(_evaluate(condition, dot, scope)):
                    _run_scoped(body, dot, scope, out)
                    break
            else:
                _run_scoped(node.otherwise, dot, scope, out)
        elif node.kind == "range":
            for position, item in enumerate(_evaluate(node.expr, dot, scope) or ()):
                scope.frames.append({})
                if len(node.names) == 2:
                    scope.frames[-1].update({node.names[0]: position, node.names[1]: item})
                elif node.names:
                    scope.frames[-1][node.names[0]] = item
                try:
                    _run(node.body, item, scope, out)
                except _Continue:
                    pass
                finally:
                    scope.frames.pop()


def _run_scoped(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    scope.frames.append({})
    try:
        _run(nodes, dot, scope, out)
    finally:
        scope.frames.pop()


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render `template` on data ({"Messages": [{"Role", "Content"}], "System", …}) like Go would."""
    out: list[str] = []
    _run(parse(template), data, _Scope(data), out)
    return "".join(out)
