"""Checks every ttnn call in the backend's source against the installed ttnn's signatures.

The backend cannot run here (no chip), so the cheapest failure to catch is an API drift: a
function or keyword the pinned ttnn does not have. Calls are found in the source with `ast`
(every `ttnn.a.b(...)`), signatures read from nanobind's `__nb_signature__` or `inspect`.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Call:
    name: str  # "ttnn.experimental.paged_update_cache"
    keywords: tuple[str, ...]
    num_positional: int
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.name}({self.num_positional} positional, keywords {list(self.keywords)})"


@dataclass(frozen=True)
class Params:
    positional: tuple[str, ...]  # may be passed by position
    keyword: frozenset[str]  # may be passed by keyword
    var_positional: bool
    var_keyword: bool

    def accepts(self, call: Call) -> bool:
        if call.num_positional > len(self.positional) and not self.var_positional:
            return False
        by_position = set(self.positional[: call.num_positional])
        return self.var_keyword or all(k in self.keyword and k not in by_position for k in call.keywords)


def dotted(node: ast.AST) -> str | None:
    """`ttnn.a.b` for ttnn.a.b and for self.ttnn.a.b (a class holding the module); else the name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        name = f"{base}.{node.attr}" if base else None
        return name.removeprefix("self.") if name and name.startswith("self.ttnn.") else name
    return None


def ttnn_calls(paths: list[Path]) -> tuple[list[Call], set[str]]:
    """Every call of a `ttnn.` name, and every other `ttnn.` name referenced (dtypes, layouts)."""
    calls, names = [], set()
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        called = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = dotted(node.func)
                if name and name.startswith("ttnn."):
                    called.add(id(node.func))
                    has_star = any(isinstance(a, ast.Starred) for a in node.args)
                    keywords = tuple(k.arg for k in node.keywords if k.arg is not None)
                    positional = len(node.args) if not has_star else 0
                    calls.append(Call(name, keywords, positional, f"{path.name}:{node.lineno}"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in called:
                name = dotted(node)
                if name and name.startswith("ttnn."):
                    names.add(name)
    return calls, names


def resolve(ttnn_module, name: str):
    obj = ttnn_module
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def signatures(obj) -> list[Params]:
    """Each overload's parameters; [] when the object does not say."""
    target = getattr(obj, "function", obj)  # ttnn.decorators.FastOperation wraps a C++ op or a function
    for candidate in (target, type(target).__call__, getattr(target, "__init__", None)):
        nb = getattr(candidate, "__nb_signature__", None)
        if nb:
            return [parse_nb_signature(sig[0]) for sig in nb]
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    kinds = inspect.Parameter
    params = list(sig.parameters.values())
    return [
        Params(
            positional=tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)),
            keyword=frozenset(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)),
            var_positional=any(p.kind == kinds.VAR_POSITIONAL for p in params),
            var_keyword=any(p.kind == kinds.VAR_KEYWORD for p in params),
        )
    ]


def parse_nb_signature(text: str) -> Params:
    """`def f(self, a: T = \\0, *, b: list[int, str] | None = \\1) -> R` to its parameters."""
    start = text.index("(") + 1
    depth, end = 1, start
    while depth:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(text[end], 0)
        end += 1
    parts, depth, current = [], 0, ""
    for ch in text[start : end - 1]:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    positional, keyword, kw_only, var_pos, var_kw = [], set(), False, False, False
    for part in parts:
        name = re.split(r"[:=]", part, maxsplit=1)[0].strip().replace("\\", "")
        if name == "self":
            continue
        if name == "*":
            kw_only = True
        elif name.startswith("**"):
            var_kw = True
        elif name.startswith("*"):
            var_pos, kw_only = True, True
        elif name == "/":
            keyword.difference_update(positional)
        else:
            keyword.add(name)
            if not kw_only:
                positional.append(name)
    return Params(tuple(positional), frozenset(keyword), var_pos, var_kw)


def check(ttnn_module, paths: list[Path]) -> list[str]:
    """Problems found: a missing name, or a call no overload accepts."""
    calls, names = ttnn_calls(paths)
    problems = []
    for name in sorted(names):
        try:
            resolve(ttnn_module, name)
        except AttributeError:
            problems.append(f"{name} does not exist in the installed ttnn")
    for call in calls:
        try:
            obj = resolve(ttnn_module, call.name)
        except AttributeError:
            problems.append(f"{call}: {call.name} does not exist")
            continue
        overloads = signatures(obj)
        if not overloads:
            problems.append(f"{call}: ttnn gives no signature to check it against")
        elif not any(params.accepts(call) for params in overloads):
            problems.append(f"{call}: no overload accepts it")
    return problems
