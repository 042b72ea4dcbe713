"""What a sweep runs: the cross product of configs × prompts × seeds at one length.

A :class:`SweepJob` is one ordinary ``generate`` run, fully described by plain data (the
config file, ``--set`` overrides, a conditions schedule, a seed and a block count), so it
can be shipped to a Ray worker and matched against earlier results. Nothing here imports
Ray or builds a model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from packforcing.core.conditions import ConditionError, ConditionSchedule
from packforcing.core.errors import ConfigError

DEFAULT_PROMPT = "default"
"""The name of the one prompt of a sweep without ``--prompts`` (the config's own conditions)."""

JOB_KEYS = ("seed", "blocks", "threads")
"""``run`` keys a job sets itself; they are left out of the config hash and matched separately
(as is ``run.prompts`` when the sweep gives prompts; ``run.threads`` changes speed, not output)."""


def slug(text: str, limit: int = 40) -> str:
    """``text`` as a file-name fragment: ``[A-Za-z0-9_.]`` kept, runs of anything else → ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_.")
    return cleaned[:limit].rstrip("_.") or "prompt"


def canonical(data: Any) -> str:
    """Stable JSON text of ``data`` (sorted keys, no spaces): what hashes and job keys compare."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(resolved: Mapping[str, Any], *, without_prompts: bool = False) -> str:
    """First 16 hex digits of the SHA-256 of the resolved config without the job's own keys
    (``run.seed``, ``run.blocks``, ``run.threads`` and, if the sweep sets them,
    ``run.prompts``): equal for every job of one config in a sweep."""
    data = json.loads(canonical(resolved))
    run = data.get("run") or {}
    for key in (*JOB_KEYS, "prompts") if without_prompts else JOB_KEYS:
        run.pop(key, None)
    return hashlib.sha256(canonical(data).encode()).hexdigest()[:16]


@attrs.frozen
class Prompt:
    """One prompt of a sweep: a ``name`` for run directories and a conditions ``schedule``
    (segments ``{"from_block": N, **spec}``, set as ``run.prompts``), or ``None`` for the
    config's own conditions (then part of the config hash)."""

    name: str
    schedule: tuple[dict[str, Any], ...] | None = None

    @property
    def key(self) -> str:
        return canonical(None if self.schedule is None else list(self.schedule))


def _schedule(entry: Any, where: str) -> tuple[dict[str, Any], ...]:
    if isinstance(entry, str):
        return ({"from_block": 0, "prompt": entry},)
    if isinstance(entry, Mapping):
        if "schedule" in entry:
            segments = entry["schedule"]
            if not isinstance(segments, list) or not segments or not all(isinstance(s, Mapping) for s in segments):
                raise ConfigError("schedule: expected a non-empty list of mappings", source=where)
            return tuple(dict(s) for s in segments)
        spec = {k: v for k, v in entry.items() if k != "name"}
        if not spec:
            raise ConfigError("expected a prompt text or condition keys besides 'name'", source=where)
        return ({"from_block": 0, **spec},)
    raise ConfigError(f"expected a string or a mapping, got {type(entry).__name__}", source=where)


def _resolve_embeds(schedule: tuple[dict[str, Any], ...], base: Path) -> tuple[dict[str, Any], ...]:
    """``embeds`` files named relative to the prompts file, made absolute (as ``generate
    --prompts`` does), so a job finds them from any working directory."""
    out = []
    for segment in schedule:
        if isinstance(segment.get("embeds"), str):
            file = Path(segment["embeds"]).expanduser()
            segment = {**segment, "embeds": str(file if file.is_absolute() else (base / file).resolve())}
        out.append(segment)
    return tuple(out)


def _check_schedule(schedule: tuple[dict[str, Any], ...], where: str) -> None:
    """A schedule as ``run.prompts`` takes it, whose segments may start ``from_second`` instead
    (converted per config, at its fps and geometry, as ``generate --prompts`` converts them; one
    schedule may mix both, as a prompt file may): each segment one start, the first at 0, the
    starts of each kind increasing (the order of the two kinds together is checked per config,
    once the seconds are blocks)."""
    if any("from_second" in seg for seg in schedule):
        previous: dict[str, float] = {}  # the last start of each kind, checked
        for i, seg in enumerate(schedule):
            keys = [key for key in ("from_block", "from_second") if key in seg]
            if len(keys) != 1:
                raise ConfigError(f"schedule[{i}]: give exactly one of from_block, from_second", source=where)
            key, start = keys[0], seg[keys[0]]
            kind = (int,) if key == "from_block" else (int, float)
            if isinstance(start, bool) or not isinstance(start, kind) or not 0 <= start < float("inf"):
                what = "an integer" if key == "from_block" else "a number"
                raise ConfigError(f"schedule[{i}].{key}: expected {what} >= 0, got {start!r}", source=where)
            if (i == 0 and start != 0) or (key in previous and start <= previous[key]):
                problem = "must be 0" if i == 0 else f"must be greater than {previous[key]}"
                raise ConfigError(f"schedule[{i}].{key}: {problem}, got {start!r}", source=where)
            previous[key] = start
        # the rest is checked as run.prompts would check it, with the segments' order as blocks
        starts = ("from_block", "from_second")
        schedule = tuple({"from_block": i, **{k: v for k, v in seg.items() if k not in starts}}
                         for i, seg in enumerate(schedule))  # fmt: skip
    try:
        ConditionSchedule.parse(list(schedule), name="schedule")
    except ConditionError as exc:
        raise ConfigError(str(exc), source=where) from None


def _in_blocks(prompt: Prompt, config: Any) -> Prompt:
    """``prompt`` with ``from_second`` starts turned into ``from_block`` for ``config`` (as
    ``generate --prompts`` converts them: its fps, block length and VAE temporal stride)."""
    if prompt.schedule is None or not any("from_second" in seg for seg in prompt.schedule):
        return prompt
    from packforcing.core.build import build_for_planning
    from packforcing.core.geometry import temporal_stride_of
    from packforcing.models.wan.text import to_block_schedule

    env = build_for_planning(config)
    assert env.geometry is not None
    try:
        segments = to_block_schedule(
            prompt.schedule,
            fps=config.run.fps,
            frames_per_block=env.geometry.frames_per_block,
            temporal_stride=temporal_stride_of(env.model),
            where=f"prompt {prompt.name!r}",
        )
    except ValueError as exc:
        raise ConfigError(str(exc), source=config.source) from None
    return Prompt(prompt.name, tuple(segments))


def _prompt_name(entry: Any, schedule: tuple[dict[str, Any], ...], index: int) -> str:
    if isinstance(entry, Mapping) and entry.get("name") is not None:
        return slug(str(entry["name"]))
    if isinstance(entry, str):
        return slug(entry)
    spec = {k: v for k, v in schedule[0].items() if k != "from_block"}
    if len(schedule) == 1 and spec:
        return slug("_".join(f"{k}{v}" for k, v in spec.items() if not isinstance(v, (dict, list))) or f"p{index}")
    return f"p{index}"


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompts file: one prompt per job.

    - ``.txt``: one text prompt per line (blank lines and ``#`` comments skipped), as
      VBench-style prompt lists are written;
    - ``.yaml`` / ``.yml`` / ``.json``: a list whose items are a text (``"a red fox"``), a
      mapping of condition keys with an optional ``name`` (``{name: s2, scene: 2}``), or
      ``{name: ..., schedule: [{from_block: 0, ...}, {from_block: 8, ...}]}`` for a
      schedule that changes along the video (``from_second`` instead of ``from_block`` is
      converted per config, as ``generate --prompts`` converts it; ``embeds`` files are
      relative to the prompts file).

    Names (given, or made from the text) become the ``<prompt>`` part of run directories and
    must be distinct.
    """
    path = Path(path)
    label = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts file: {getattr(exc, 'strerror', None) or exc}", source=label) from None
    if path.suffix == ".txt":
        entries: list[Any] = [line.strip() for line in text.splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    else:
        try:
            entries = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{label}:{mark.line + 1}" if mark is not None else label
            raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", source=where) from None
        if not isinstance(entries, list):
            raise ConfigError("expected a list of prompts", source=label)
    if not entries:
        raise ConfigError("no prompts", source=label)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{label}: [{index}]"
        schedule = _resolve_embeds(_schedule(entry, where), path.parent)
        _check_schedule(schedule, where)
        name = _prompt_name(entry, schedule, index)
        if name in seen:
            raise ConfigError(
                f"prompt name {name!r} repeats item [{seen[name]}]; give each a distinct 'name'", source=where
            )
        seen[name] = index
        prompts.append(Prompt(name, schedule))
    return prompts


@attrs.frozen
class SweepJob:
    """One ``generate`` run of a sweep, as plain data.

    ``overrides`` are the user's ``--set`` values; :meth:`job_overrides` adds the ``device``
    the job is pinned to (``cpu``, or ``cuda``: the GPU Ray gives the task) and the job's own
    seed, length and prompt schedule.
    """

    config_path: str
    config_name: str
    config_hash: str
    policy: str
    prompt: Prompt
    seed: int
    blocks: int
    overrides: tuple[str, ...] = ()
    device: str = "cpu"
    save_latents: bool = attrs.field(default=False, eq=False)
    """Also write ``latents.safetensors`` (not part of the job's identity)."""

    @property
    def name(self) -> str:
        """``<config>-<prompt>-<seed>``: the run directory under ``DIR/runs/``."""
        return f"{self.config_name}-{self.prompt.name}-{self.seed}"

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What identifies a finished job across reruns: config hash, prompt, seed, length."""
        return (self.config_hash, self.prompt.key, self.seed, self.blocks)

    def job_overrides(self) -> list[str]:
        out = [*self.overrides, f"run.device={self.device}", f"run.seed={self.seed}", f"run.blocks={self.blocks}"]
        if self.prompt.schedule is not None:
            out.append(f"run.prompts={canonical(list(self.prompt.schedule))}")
        return out

    def as_record(self) -> dict[str, Any]:
        """The job's identity as written in ``results.jsonl``."""
        return {
            "job": self.name,
            "config": self.config_name,
            "config_path": self.config_path,
            "config_hash": self.config_hash,
            "policy": self.policy,
            "prompt": self.prompt.name,
            "prompt_schedule": None if self.prompt.schedule is None else list(self.prompt.schedule),
            "seed": self.seed,
            "blocks": self.blocks,
            "device": self.device,
        }


def config_names(paths: Sequence[str]) -> list[str]:
    """Short distinct names for config files: the stem (``sink_recent``), or with its parent
    folders (``wan1.3b_packforcing``) where stems collide."""
    resolved = [Path(p).resolve() for p in paths]
    depth = 1
    while True:
        names = [slug("_".join(p.with_suffix("").parts[-depth:]), limit=80) for p in resolved]
        if len(set(names)) == len(names) or depth > max(len(p.parts) for p in resolved):
            return names
        depth += 1


MAX_SEEDS = 100_000
"""The most seeds one ``--seeds`` may name (a typo such as ``0-99999999999`` is refused at once
instead of building billions of jobs)."""


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or a range ``"0-7"`` (or a mix, ``"0-3,9"``) → distinct seeds in order, each a
    valid ``run.seed`` (``< 2**63``), at most :data:`MAX_SEEDS` of them."""
    from packforcing.core.validators import SEED_LIMIT

    seeds: dict[int, None] = {}  # ordered, with O(1) membership
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"--seeds: expected integers >= 0 like 0,1,2 or 0-7, got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--seeds: empty range {part!r}")
        if hi >= SEED_LIMIT:
            raise ValueError(f"--seeds: {hi} is not a valid seed (seeds are integers >= 0 and < 2**63)")
        if hi - lo + 1 + len(seeds) > MAX_SEEDS:
            raise ValueError(f"--seeds: {text!r} names more than {MAX_SEEDS:,} seeds")
        seeds.update(dict.fromkeys(range(lo, hi + 1)))
    return list(seeds)


def expand_jobs(
    configs: Sequence[str],
    *,
    prompts: Sequence[Prompt] | None = None,
    seeds: Sequence[int] = (0,),
    blocks: int | None = None,
    seconds: float | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    save_latents: bool = False,
) -> list[SweepJob]:
    """The cross product configs × prompts × seeds, each job pinned to ``device``.

    Every config is loaded, built for planning and checked here (a bad one raises its
    one-line :class:`ConfigError` before anything runs). The length is ``blocks``, or
    ``seconds`` converted with the config's geometry, or the config's ``run.blocks``.
    """
    from packforcing.core.build import check_config
    from packforcing.core.config import load_config

    if blocks is not None and seconds is not None:
        raise ValueError("give --blocks or --seconds, not both")
    if not configs:
        raise ValueError("no configs given")
    overrides = tuple(overrides)
    base = [*overrides, f"run.device={device}"]
    prompts = list(prompts) if prompts else [Prompt(DEFAULT_PROMPT)]
    jobs: list[SweepJob] = []
    files = [_config_file(path) for path in configs]
    for path, name in zip(files, config_names(files), strict=True):
        config = check_config(load_config(path, base))
        resolved = config.resolved()
        length = blocks if blocks is not None else config.run.blocks
        if seconds is not None:
            length = blocks_for_seconds(config, seconds)
        policy = resolved["policy"]["name"]
        planned: Any = None  # the config's planning model (no weights), built once if a prompt needs it
        for prompt in prompts:
            prompt = _in_blocks(prompt, config)
            if prompt.schedule is not None:
                planned = planned or _planning_model(config)
                _check_conditions(planned, prompt, config)
            chash = config_hash(resolved, without_prompts=prompt.schedule is not None)
            for seed in seeds:
                jobs.append(SweepJob(path, name, chash, policy, prompt, seed, length, overrides, device, save_latents))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("two jobs would share a run directory; give the configs or prompts distinct names")
    return jobs


def _planning_model(config: Any) -> Any:
    from packforcing.core.build import build_for_planning

    return build_for_planning(config).model


def _check_conditions(model: Any, prompt: Prompt, config: Any) -> None:
    """``prompt``'s conditions that need no text encoder (``{scene: 2}``, ``embeds`` files)
    checked by ``config``'s planning model, as ``generate`` checks them before it runs: a
    condition the model does not take is one line naming the prompt and the config, before
    any job runs, not a failure of every job."""
    from packforcing.core.conditions import check_given_conditions

    assert prompt.schedule is not None
    try:
        check_given_conditions(model, prompt.schedule, f"prompt {prompt.name!r}", config)
    except ValueError as exc:
        raise ConfigError(str(exc), source=config.source) from None


def _config_file(source: str) -> str:
    """A config file or preset name (``sink_recent``) as an absolute file path, so a job finds
    it from any working directory (left as given when missing: the loader reports it)."""
    from packforcing import presets

    path = presets.resolve(source)
    return str(path.resolve()) if path.is_file() else source


def blocks_for_seconds(config: Any, seconds: float) -> int:
    """Blocks covering ``seconds`` of video for ``config``: the conversion ``generate
    --seconds`` makes (the model's geometry, its VAE's temporal stride, ``run.fps``)."""
    from packforcing.core.build import build_for_planning
    from packforcing.core.geometry import temporal_stride_of
    from packforcing.output.video import blocks_for_seconds as blocks_for

    if not 0 < seconds < float("inf"):
        raise ValueError(f"--seconds: expected a number > 0, got {seconds}")
    env = build_for_planning(config)
    assert env.geometry is not None
    return blocks_for(seconds, config.run.fps, env.geometry.frames_per_block, temporal_stride_of(env.model))
