"""YAML read with the line and column of every value, so a kit's problem can point at the place to fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["Located", "YamlProblem", "load_located"]


class YamlProblem(ValueError):
    """A problem at ``file:line:column`` (1-based; line/column None for the whole file)."""

    def __init__(self, file: str, line: int | None, column: int | None, message: str):
        self.file, self.line, self.column, self.message = file, line, column, message
        where = file if line is None else f"{file}:{line}:{column}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Located:
    """A YAML value (a plain str / int / float / bool / None, a list of Located, or a dict of str -> Located) and
    where it starts in its file; ``path`` is the dotted key path, for messages."""

    value: Any
    file: str
    line: int
    column: int
    path: str

    def problem(self, message: str) -> YamlProblem:
        return YamlProblem(self.file, self.line, self.column, f"{self.path}: {message}" if self.path else message)

    def plain(self) -> Any:
        """The value with every Located inside it unwrapped."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def _convert(node: yaml.Node, file: str, path: str) -> Located:
    line, column = node.start_mark.line + 1, node.start_mark.column + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Located] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str) or not key:
                raise YamlProblem(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                  f"{path or 'mapping'}: keys must be text")
            if key in out:
                raise YamlProblem(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                  f"{path + '.' if path else ''}{key}: appears twice")
            out[key] = _convert(value_node, file, f"{path}.{key}" if path else key)
        return Located(out, file, line, column, path)
    if isinstance(node, yaml.SequenceNode):
        return Located([_convert(v, file, f"{path}[{i}]") for i, v in enumerate(node.value)], file, line, column, path)
    # A scalar: resolved the way safe_load would (ints, floats, booleans, null, text); no custom tags.
    value = yaml.SafeLoader.construct_scalar(yaml.SafeLoader(""), node)  # type: ignore[arg-type]
    tag = node.tag
    if tag == "tag:yaml.org,2002:int":
        value = int(str(value).replace("_", ""), 0) if str(value).lower().startswith(("0x", "0o")) else int(str(value).replace("_", ""))
    elif tag == "tag:yaml.org,2002:float":
        value = float(str(value).replace("_", ""))
    elif tag == "tag:yaml.org,2002:bool":
        value = str(value).lower() in ("yes", "true", "on")
    elif tag == "tag:yaml.org,2002:null":
        value = None
    elif tag != "tag:yaml.org,2002:str":
        raise YamlProblem(file, line, column, f"{path}: unsupported YAML tag {tag}")
    return Located(value, file, line, column, path)


def load_located(text: str, file: str) -> Located:
    """``text`` parsed as YAML with positions. Anchors and aliases are refused (a kit never needs them, and an
    alias bomb could not blow up the reader)."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise YamlProblem(file, mark.line + 1, mark.column + 1, "YAML aliases (*name) are not allowed in a brand kit")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlProblem(file, None if mark is None else mark.line + 1, None if mark is None else mark.column + 1,
                          f"invalid YAML: {problem}") from None
    if node is None:
        raise YamlProblem(file, None, None, "the file is empty")
    return _convert(node, file, "")
