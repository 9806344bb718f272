"""Read a config text stored in a checkpoint as data, without executing it.

mmengine's Runner stores ``cfg.pretty_text`` in every checkpoint (``meta['cfg']`` and
``message_hub.runtime_info['cfg']``), and ``BaseInferencer`` (mmdet's ``DetInferencer(
weights=ckpt)`` with no config) rebuilds the model from it with ``Config.fromstring``, which
writes the text to a file and runs it as Python: a checkpoint that holds only strings and
tensors would run code there. A config written by mmengine is plain data: one assignment per
top-level name whose value is a literal, a list/tuple/set/dict of them, or ``dict(key=value,
...)``. :func:`literal_config` accepts exactly that and refuses anything else (calls other than
``dict``, names, attribute access, imports, comprehensions, ...) with the line that was refused.
"""
import ast
from typing import Any, Dict

__all__ = ['ConfigNotLiteralError', 'literal_config', 'MAX_CONFIG_CHARS']

MAX_CONFIG_CHARS = 4_000_000  # a dumped detector config is ~10-30 kB


class ConfigNotLiteralError(ValueError):
    """The config text holds something other than plain data."""


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand)
        if isinstance(operand, (int, float, complex)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    elif isinstance(node, ast.List):
        return [_value(item) for item in node.elts]
    elif isinstance(node, ast.Tuple):
        return tuple(_value(item) for item in node.elts)
    elif isinstance(node, ast.Set):
        return {_value(item) for item in node.elts}
    elif isinstance(node, ast.Dict) and None not in node.keys:  # no `**mapping`
        return {_value(key): _value(value) for key, value in zip(node.keys, node.values)}
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == 'dict' and not node.args
          and all(keyword.arg is not None for keyword in node.keywords)):
        return {keyword.arg: _value(keyword.value) for keyword in node.keywords}
    raise ConfigNotLiteralError(
        f'line {getattr(node, "lineno", "?")}: {type(node).__name__} is not plain data')


def literal_config(text: str) -> Dict[str, Any]:
    """The ``name = value`` assignments of a dumped config as a dict, evaluated as literals.

    Raises:
        ConfigNotLiteralError: the text is too long, not Python, or anything in it is not a
            plain-data assignment (the message names the line).
    """
    if not isinstance(text, str):
        raise ConfigNotLiteralError(f'the config is a {type(text).__name__}, not a text')
    if len(text) > MAX_CONFIG_CHARS:
        raise ConfigNotLiteralError(f'the config text has {len(text)} characters '
                                    f'(at most {MAX_CONFIG_CHARS})')
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ConfigNotLiteralError(f'the config text is not Python: {error}') from None
    config = {}
    for statement in tree.body:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise ConfigNotLiteralError(f'line {statement.lineno}: only `name = value` '
                                        f'assignments are data, not {type(statement).__name__}')
        try:
            config[statement.targets[0].id] = _value(statement.value)
        except RecursionError:
            raise ConfigNotLiteralError(
                f'line {statement.lineno}: the value is nested too deeply') from None
        except TypeError as error:  # an unhashable set item or dict key
            raise ConfigNotLiteralError(f'line {statement.lineno}: {error}') from None
    return config
