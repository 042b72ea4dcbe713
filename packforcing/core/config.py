"""Loading, composing and validating run configurations.

A config is a mapping with the top-level keys ``model``, ``policy``, ``compressor``,
``selector``, ``positional``, ``attention``, ``sampler`` and ``run`` (plus ``text_encoder``
for models conditioned on text prompts). Component blocks are
``name:`` plus that component's parameters (declared by its plugin as an attrs class); a
``sampler`` block without a ``name`` is the default ``euler`` sampler.

Composition rules:

- ``extends: <path>`` or a list of paths (relative to the file) are loaded first and
  deep-merged in order, later wins; the file's own keys are merged last. Cycles and missing
  files are errors.
- Mappings merge key by key; lists and scalars are replaced. A component block whose ``name``
  differs from the one it extends *replaces* it: the old component's parameters are not
  merged into the new one.
- ``overrides`` such as ``"policy.window_frames=64"`` or ``"policy.tiers[1].blocks=8"`` are
  applied last, with values parsed as YAML (``8`` is an integer, ``[1, 2, 2]`` a list).

Every problem raises :class:`ConfigError` naming the file (or ``--set``) that set the
offending key and the key path.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml

from packforcing import presets
from packforcing.core.conditions import ConditionError, ConditionSchedule
from packforcing.core.errors import ConfigError, ParamError
from packforcing.core.geometry import DTYPES
from packforcing.core.structure import show, structure, unstructure
from packforcing.core.validators import non_negative, one_of, optional_positive, positive
from packforcing.plugins.kinds import KINDS, SECTIONS

COMPONENT_KEYS = tuple(k.key for k in KINDS)
"""Config keys of the component sections, in build order (from :data:`packforcing.plugins.kinds.KINDS`)."""
TOP_KEYS = (*COMPONENT_KEYS, *SECTIONS)
DEFAULT_COMPONENTS = {k.key: k.default for k in KINDS if k.default is not None}
NAME_OPTIONAL = tuple(k.key for k in KINDS if k.name_optional)
"""Component blocks whose ``name`` may be left out (the default component is meant)."""
OPTIONAL_COMPONENTS = tuple(k.key for k in KINDS if k.optional)
OVERRIDE_SOURCE = "--set"

KeyPath = tuple[str, ...]
_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _positive_number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ParamError(attribute.name, f"expected a number > 0, got {show(value)}")


def _prompts(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    try:
        ConditionSchedule.parse(value, name=attribute.name)
    except ConditionError as exc:
        raise ParamError(exc.path(attribute.name), exc.message) from None


def _threads(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise ParamError(attribute.name, f"expected an integer >= 1 or auto, got {show(value)}")


@attrs.frozen
class RunParams:
    """The ``run:`` block."""

    seed: int = attrs.field(default=0, validator=non_negative)
    blocks: int = attrs.field(default=16, validator=positive)
    batch_size: int = attrs.field(default=1, validator=positive)
    device: str = "auto"
    dtype: str = attrs.field(default="float32", validator=one_of(*DTYPES))
    fps: float = attrs.field(default=16.0, validator=_positive_number)
    """Frames per second of the written video (one latent frame decodes to one frame)."""
    threads: int | str = attrs.field(default="auto", validator=_threads)
    """CPU intra-op threads: an integer >= 1, or ``auto`` (from the model size and the cores;
    see :mod:`packforcing.core.threads`)."""
    prompts: list[dict[str, Any]] | None = attrs.field(default=None, validator=_prompts)
    """Per-block condition schedule ``[{from_block: 0, **spec}, ...]`` (model-specific specs, e.g.
    ``{embeds: FILE}`` for ``wan``); ``None``: unconditional."""
    recache: bool = False
    """At each prompt switch, re-run the clean pass of the blocks held at full resolution under the
    new prompt (LongLive's KV re-cache)."""
    checkpoint_every: int | None = attrs.field(default=None, validator=optional_positive)
    """``generate`` saves the whole generation state every N blocks (and always when interrupted)."""

    def schedule(self) -> ConditionSchedule:
        """``prompts`` as a :class:`~packforcing.core.conditions.ConditionSchedule`."""
        return ConditionSchedule.parse(self.prompts, name="run.prompts")


def _device_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value != "auto":
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise ParamError(attribute.name, f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}") from None


def _dtype_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value != "auto" and value not in DTYPES:
        raise ParamError(attribute.name, f"expected 'auto' or one of {sorted(DTYPES)}, got {value!r}")


@attrs.frozen
class TextEncoderParams:
    """Where and how to run the UMT5 text encoder (the ``text_encoder:`` config block).

    ``path``: a diffusers pipeline root (``text_encoder/`` + ``tokenizer/``) or the encoder
    folder; ``tokenizer``: its folder when it is elsewhere; ``device``: ``auto`` (CUDA when
    available) or a torch device; ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on the CPU).
    """

    path: str | None = None
    tokenizer: str | None = None
    device: str = attrs.field(default="auto", validator=_device_name)
    dtype: str = attrs.field(default="auto", validator=_dtype_name)
    max_length: int = attrs.field(default=512, validator=positive)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@attrs.frozen
class ComponentSpec:
    """A resolved component: its registered ``name`` and structured ``params``."""

    name: str
    params: Any


@attrs.frozen
class Config:
    """A validated configuration. ``data`` is the merged mapping it was built from; ``sources``
    records which file (or ``--set``) last set each key path, for error messages."""

    data: dict[str, Any]
    source: str | None
    components: dict[str, ComponentSpec | None]
    run: RunParams
    sources: dict[KeyPath, str] = attrs.field(factory=dict, repr=False)
    text_encoder: TextEncoderParams = attrs.field(factory=lambda: TextEncoderParams())

    @property
    def sampler(self) -> Any:
        """The ``sampler`` block's structured parameters (for the built-ins, the sampler itself)."""
        spec = self.components["sampler"]
        assert spec is not None
        return spec.params

    def resolved(self) -> dict[str, Any]:
        """Every section with defaults filled in (YAML/JSON-able)."""
        out: dict[str, Any] = {}
        for key in COMPONENT_KEYS:
            spec = self.components.get(key)
            out[key] = None if spec is None else {"name": spec.name, **unstructure(spec.params)}
        out["run"] = unstructure(self.run)
        if self.text_encoder != TextEncoderParams():
            out["text_encoder"] = unstructure(self.text_encoder)
        return out

    def source_of(self, path: str | None) -> str | None:
        """The file (or ``--set``) that set key ``path`` (``"policy.tiers[1].blocks"``), or the
        closest enclosing key that was set; the config's own file if none was."""
        return _source_of(self.sources, path, self.source)


def _split_path(path: str) -> KeyPath:
    """``"policy.tiers[1].blocks"`` → ``("policy", "tiers", "1", "blocks")``."""
    parts: list[str] = []
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
        if m is None:
            parts.append(part)
            continue
        if m.group(1):
            parts.append(m.group(1))
        parts.extend(re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(parts)


def _source_of(sources: Mapping[KeyPath, str], path: str | None, default: str | None) -> str | None:
    if not path:
        return default
    parts = _split_path(path)
    for n in range(len(parts), 0, -1):
        found = sources.get(parts[:n])
        if found is not None:
            return found
    return default


def _locate(exc: ConfigError, sources: Mapping[KeyPath, str], default: str | None) -> ConfigError:
    """``exc`` attributed to the file that set its key path (if it names no file yet)."""
    return exc.located(_source_of(sources, exc.path, default))


# ---------------------------------------------------------------------- YAML files
def file_label(path: Path) -> str:
    """How a file is named in messages: relative to the working directory when below it."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: let the base constructor report it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _missing_file(path: Path) -> str:
    hint = ""
    if path.parent.is_dir():
        siblings = {p.stem: p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")}
        close = difflib.get_close_matches(path.stem, list(siblings), n=1)
        hint = f" (did you mean {siblings[close[0]]!r}?)" if close else ""
    if not hint and len(path.parts) == 1:
        close = difflib.get_close_matches(path.stem, presets.names(), n=1)
        hint = f" (did you mean the preset {close[0]!r}?)" if close else " (nor a preset: see 'packforcing presets')"
    return f"file not found{hint}"


MAX_CONFIG_BYTES = 1 << 20
"""Config files larger than this (1 MiB) are refused unread."""
MAX_YAML_NODES = 100_000
"""A YAML document whose aliases expand to more nodes than this is refused (alias bombs)."""
YAML_SUFFIXES = (".yaml", ".yml")


def file_problem(path: Path, *, yaml_suffix: bool = False) -> str | None:
    """Why ``path`` cannot be a config file (missing, a directory, a FIFO or device, too large;
    with ``yaml_suffix``, not named ``.yaml``/``.yml``), without opening it; ``None`` if it may
    be read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return _missing_file(path)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a YAML file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        return f"is {kind}, not a regular file"
    if info.st_size > MAX_CONFIG_BYTES:
        return f"is {info.st_size} bytes; config files are limited to {MAX_CONFIG_BYTES} bytes"
    if yaml_suffix and path.suffix.lower() not in YAML_SUFFIXES:
        return "not a YAML file (files given to extends end in .yaml or .yml)"
    return None


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes ``node`` stands for once every alias is expanded (stops past the limit)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_YAML_NODES + 1  # a node reached again while expanding itself: unbounded
    count = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        count += _expanded_nodes(child, memo)
        if count > MAX_YAML_NODES:
            break
    memo[key] = count
    return count


def _read_yaml(path: Path) -> dict[str, Any]:
    label = file_label(path)
    problem = file_problem(path)
    if problem:
        raise ConfigError(problem, source=label)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=label) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"is larger than {MAX_CONFIG_BYTES} bytes, the limit for config files", source=label)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not a text file", source=label) from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise ConfigError(
                f"YAML aliases expand to more than {MAX_YAML_NODES} nodes; refusing it (an alias bomb?)", source=label
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", source=where) from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply", source=label) from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}", source=label)
    return dict(data)


def _replaces(old: Any, new: Any) -> bool:
    """``new`` names a different component than ``old``: it replaces it instead of merging."""
    return (
        isinstance(old, Mapping)
        and isinstance(new, Mapping)
        and "name" in old
        and "name" in new
        and new["name"] != old["name"]
    )


def deep_merge(
    base: Mapping[str, Any], over: Mapping[str, Any], *, _prefix: KeyPath = (), _replaced: list[KeyPath] | None = None
) -> dict[str, Any]:
    """``over`` merged into ``base``; a component block naming another component replaces it."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        old = out.get(key)
        path = (*_prefix, str(key))
        if isinstance(old, Mapping) and isinstance(value, Mapping) and not _replaces(old, value):
            out[key] = deep_merge(old, value, _prefix=path, _replaced=_replaced)
        else:
            out[key] = copy.deepcopy(value)
            if _replaced is not None and key in base:
                _replaced.append(path)
    return out


def _key_paths(data: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every mapping key path in ``data`` (lists are leaves: they are replaced, never merged)."""
    out: list[KeyPath] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = (*prefix, str(key))
            out.append(path)
            out.extend(_key_paths(value, path))
    return out


def _compose(
    base: dict[str, Any], base_sources: dict[KeyPath, str], over: Mapping[str, Any], over_sources: dict[KeyPath, str]
) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    replaced: list[KeyPath] = []
    merged = deep_merge(base, over, _replaced=replaced)
    sources = {p: s for p, s in base_sources.items() if not any(p[: len(r)] == r and len(p) > len(r) for r in replaced)}
    sources.update(over_sources)
    return merged, sources


def _load_file(path: Path, stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    """Merged data of ``path`` and its ``extends`` chain, and the file that set each key path."""
    path = path.resolve()
    label = file_label(path)
    if path in stack:
        chain = " -> ".join(file_label(p) for p in (*stack, path))
        raise ConfigError(f"cyclic extends: {chain}", source=file_label(stack[-1]), path="extends")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    single = isinstance(parents, str)
    if parents is None:
        parents = []
    elif single:
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"expected a path or a list of paths, got {show(parents)}", source=label, path="extends")
    merged: dict[str, Any] = {}
    sources: dict[KeyPath, str] = {}
    for i, parent in enumerate(parents):
        parent_path = path.parent / parent
        where = "extends" if single else f"extends[{i}]"
        problem = file_problem(parent_path, yaml_suffix=True)  # never read /etc/shadow as a parent
        if problem:
            raise ConfigError(f"{parent}: {problem}", source=label, path=where)
        pdata, psources = _load_file(parent_path, (*stack, path))
        merged, sources = _compose(merged, sources, pdata, psources)
    return _compose(merged, sources, data, dict.fromkeys(_key_paths(data), label))


# ---------------------------------------------------------------------- overrides
def _parse_value(raw: str) -> Any:
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(
    data: dict[str, Any], override: str, sources: dict[KeyPath, str] | None = None, label: str = OVERRIDE_SOURCE
) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` (value parsed as YAML; ``a.list[1].b`` or ``a.list.1.b`` index lists)
    to a copy of ``data``; records ``label`` (``--set``, or the option that set it, e.g.
    ``--blocks``) as the source of the key in ``sources``."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"expected KEY.PATH=VALUE, got {override!r}", source=label)
    value = _parse_value(raw)
    parts = _split_path(key)
    out = copy.deepcopy(data)
    node: Any = out
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"{'.'.join(parts[:i])} is a list: index it with a number", source=label, path=key)
            index = int(part)
            if index >= len(node):
                raise ConfigError(f"index {index} is out of range ({len(node)} items)", source=label, path=key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(
                f"cannot set it: {'.'.join(parts[:i])} is {show(node)}, not a mapping", source=label, path=key
            )
        if last:
            current = node.get("name", DEFAULT_COMPONENTS.get(parts[0]) if parts[0] in NAME_OPTIONAL else None)
            if i == 1 and part == "name" and parts[0] in COMPONENT_KEYS and current not in (None, value):
                node.clear()  # a different component: the old one's parameters do not carry over
                if sources is not None:
                    for p in [p for p in sources if p[:1] == parts[:1] and len(p) > 1]:
                        del sources[p]
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and i == 0 and part in COMPONENT_KEYS:
                child = node[part] = {"name": child}  # "policy: full" spelled as a string
            node = child
        if sources is not None:
            sources[_split_path(here)] = label
    if sources is not None:
        for p in [p for p in sources if p[: len(parts)] == parts and len(p) > len(parts)]:
            sources[p] = label
    return out


# ---------------------------------------------------------------------- entry point
def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    registry: Any = None,
    labels: Iterable[str] | None = None,
) -> Config:
    """Load, compose and validate a config from a YAML path, a preset name (``"sink_recent"``,
    see :mod:`packforcing.presets`) or a mapping. ``labels[i]`` names where ``overrides[i]`` came
    from in error messages (default ``--set``)."""
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
        label = None
        sources: dict[KeyPath, str] = {}
        if "extends" in data:
            raise ConfigError("only supported in files", path="extends")
    else:
        path = presets.resolve(source)  # a file, else a packaged preset name ("sink_recent")
        if not path.exists():
            raise ConfigError(_missing_file(path), source=str(source))
        data, sources = _load_file(path, ())
        label = file_label(path.resolve())
    overrides = list(overrides)
    labels = list(labels) if labels is not None else []
    for i, override in enumerate(overrides):
        data = apply_override(data, override, sources, labels[i] if i < len(labels) else OVERRIDE_SOURCE)
    for key in data:
        if key not in TOP_KEYS:
            hint = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            shown = str(key) if _KEY_NAME.fullmatch(str(key)) else None  # never echo other text
            raise ConfigError(
                f"{'unknown top-level key' if shown else 'a top-level key that is not a name'}{did} "
                f"(expected one of: {', '.join(TOP_KEYS)})",
                source=_source_of(sources, str(key), label),
                path=shown,
            )
    if registry is None:
        from packforcing.plugins.manager import default_registry

        registry = default_registry()
    components: dict[str, ComponentSpec | None] = {}
    for key in COMPONENT_KEYS:
        where = _source_of(sources, key, label)
        block = data.get(key)
        if block is None:
            if key in OPTIONAL_COMPONENTS:
                components[key] = None
                continue
            if key not in DEFAULT_COMPONENTS:
                available = ", ".join(registry.names(key)) or "none"
                raise ConfigError(
                    f"required section is missing (a mapping with a name; available: {available})",
                    source=where,
                    path=key,
                )
            block = {"name": DEFAULT_COMPONENTS[key]}
        if isinstance(block, str):
            block = {"name": block}
        if not isinstance(block, Mapping):
            raise ConfigError(
                f"expected a component name or a mapping with a 'name', got {show(block)}", source=where, path=key
            )
        name = block.get("name")
        if name is None and key in NAME_OPTIONAL:
            name = DEFAULT_COMPONENTS[key]
        if not isinstance(name, str):
            available = ", ".join(registry.names(key)) or "none"
            problem = "required key is missing" if name is None else f"expected a string, got {show(name)}"
            raise ConfigError(
                f"{problem} (available: {available})",
                source=_source_of(sources, f"{key}.name", where),
                path=f"{key}.name",
            )
        params = {k: v for k, v in block.items() if k != "name"}
        try:
            factory = registry.factory(key, name)
        except LookupError as exc:
            raise ConfigError(
                str(exc.args[0]), source=_source_of(sources, f"{key}.name", where), path=f"{key}.name"
            ) from None
        try:
            structured = structure(factory.params, params, key)
        except ConfigError as exc:
            raise _locate(exc, sources, label) from None
        components[key] = ComponentSpec(name, structured)
    try:
        block = data.get("run")
        run = structure(RunParams, {} if block is None else block, "run")
    except ConfigError as exc:
        raise _locate(exc, sources, label) from None
    try:
        block = data.get("text_encoder")
        text_encoder = structure(TextEncoderParams, {} if block is None else block, "text_encoder")
    except ConfigError as exc:
        raise _locate(exc, sources, label) from None
    return Config(data=data, source=label, components=components, run=run, sources=sources, text_encoder=text_encoder)
