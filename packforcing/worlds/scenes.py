"""A procedural world of scenes where memory decides what comes next.

A video shows one of ``num_scenes`` *scenes* at a time. A scene is a smooth random background
texture and a few coloured objects (soft squares and discs) moving at constant speed and
bouncing off the frame edges. The video cuts between scenes at block boundaries following a
*schedule* (one scene index per block); a scene that is off screen is frozen: its objects stay
where they were. The first frame after a cut back to a scene repeats the last frame that
scene showed, and its objects resume from there. So what follows a return is fully determined
by what the scene looked like when it was last seen — possibly many blocks earlier — and only
a model that still holds that memory can reproduce it; a scene's first appearance is new.

Everything is deterministic from a seed; nothing is downloaded. Pixels are ``[3, T, H, W]``
in ``[-1, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch

from packforcing.core.validators import positive, wrap_seed


def _pair(value: Sequence[float]) -> Any:
    """Converter: ``[low, high]`` (a list from YAML, a tuple) as two floats; anything else is kept
    as given, for :func:`_range` to refuse naming the key (a converter does not know it)."""
    try:
        lo, hi = value
        return float(lo), float(hi)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range
        return value


def _range(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    pair = isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value)
    if not (pair and 0 <= value[0] <= value[1] < math.inf):
        got = list(value) if isinstance(value, (tuple, list)) else repr(value)
        raise ValueError(f"{attribute.name}: expected a range [low, high] with 0 <= low <= high < inf, got {got}")


REFERENCE_FRAME = 64
"""The frame side (pixels) the default object sizes and speeds are drawn for (the shipped world's)."""


@attrs.frozen
class SceneWorldParams:
    """What a world looks like (all sizes in pixels, speeds in pixels per frame).

    Objects must be smaller than the frame's shorter side (they bounce off its edges); a world
    whose ``object_size`` cannot fit is refused. :meth:`for_frame` scales the default sizes and
    speeds to any frame."""

    num_scenes: int = attrs.field(default=8, validator=positive)
    height: int = attrs.field(default=64, validator=positive)
    width: int = attrs.field(default=64, validator=positive)
    frames_per_block: int = attrs.field(default=4, validator=positive)
    objects_per_scene: int = attrs.field(default=2, validator=positive)
    object_size: tuple[float, float] = attrs.field(default=(14.0, 22.0), converter=_pair, validator=_range)
    speed: tuple[float, float] = attrs.field(default=(0.75, 2.0), converter=_pair, validator=_range)
    background_range: float = 0.8
    """Each scene's base colour is uniform in ``[-range, range]`` per channel: scenes differ
    mostly by colour, which only a model that remembers them can get right after a return."""
    texture_waves: int = attrs.field(default=2, validator=positive)
    texture_amplitude: float = 0.25
    texture_frequency: float = 1.5
    """Largest spatial frequency of a texture wave, in cycles per frame height/width."""

    def __attrs_post_init__(self) -> None:
        side = min(self.height, self.width)
        if self.object_size[1] >= side:
            raise ValueError(
                f"object_size: objects up to {self.object_size[1]:g} pixels do not fit a {self.height}x{self.width} "
                f"frame (they must be smaller than its shorter side, {side}; SceneWorldParams.for_frame scales the "
                "default sizes to a frame)"
            )

    @classmethod
    def for_frame(cls, height: int, width: int, **fields: Any) -> SceneWorldParams:
        """The world at a ``height × width`` frame: the default object sizes and speeds (pixels, drawn
        for a :data:`REFERENCE_FRAME`-pixel frame) scaled by ``min(height, width) / 64``, so objects
        take the same share of any frame and cross it in as many frames; at 64×64 they are the
        defaults themselves. ``fields`` set any other field (an ``object_size`` or ``speed`` given
        is taken as it is)."""
        scale = min(height, width) / REFERENCE_FRAME
        defaults = attrs.fields(cls)
        scaled: dict[str, Any] = {
            key: tuple(scale * v for v in getattr(defaults, key).default)
            for key in ("object_size", "speed")
            if key not in fields
        }
        return cls(height=height, width=width, **scaled, **fields)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(self).items()}


@attrs.frozen(eq=False)
class Scene:
    """One scene: ``background [3, H, W]``, objects' colour ``[n, 3]``, start ``[n, 2]`` (y, x
    of the top-left corner), velocity ``[n, 2]``, size ``[n]`` and shape (``True`` = disc)."""

    background: torch.Tensor
    colour: torch.Tensor
    start: torch.Tensor
    velocity: torch.Tensor
    size: torch.Tensor
    disc: torch.Tensor


def _bounce(p: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Reflect unconstrained positions ``p`` into ``[0, limit]`` (a triangle wave)."""
    period = 2 * limit
    q = torch.remainder(p, period)
    return torch.where(q > limit, period - q, q)


class SceneWorld:
    """The scenes of one world, drawn from ``seed``; :meth:`render` films a schedule."""

    def __init__(self, params: SceneWorldParams | None = None, seed: int = 0) -> None:
        self.params = params = params or SceneWorldParams()
        self.seed = seed
        gen = torch.Generator().manual_seed(wrap_seed(seed * 2_654_435_761))
        self.scenes = [self._scene(gen) for _ in range(params.num_scenes)]

    def _scene(self, gen: torch.Generator) -> Scene:
        p = self.params
        h, w = p.height, p.width

        def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape, generator=gen)

        yy = torch.arange(h, dtype=torch.float32)[:, None] / h
        xx = torch.arange(w, dtype=torch.float32)[None, :] / w
        background = uniform(-p.background_range, p.background_range, 3, 1, 1).expand(3, h, w).clone()
        for _ in range(p.texture_waves):
            fy, fx = uniform(-p.texture_frequency, p.texture_frequency, 2)
            phase = float(uniform(0, 2 * math.pi))
            wave = torch.sin(2 * math.pi * (fy * yy + fx * xx) + phase)  # [H, W]
            background += p.texture_amplitude * uniform(-1, 1, 3, 1, 1) * wave
        n = p.objects_per_scene
        hue = uniform(0, 1, n)
        colour = torch.stack([torch.cos(2 * math.pi * (hue - k / 3)) for k in range(3)], dim=1)  # saturated
        size = uniform(*p.object_size, n)
        start = torch.stack([uniform(0, 1, n) * (h - size), uniform(0, 1, n) * (w - size)], dim=1)
        angle = uniform(0, 2 * math.pi, n)
        speed = uniform(*p.speed, n)
        velocity = torch.stack([speed * torch.sin(angle), speed * torch.cos(angle)], dim=1)
        disc = torch.rand(n, generator=gen) < 0.5
        return Scene(background.clamp(-1, 1), colour, start, velocity, size, disc)

    def render_scene(self, scene: int, times: torch.Tensor) -> torch.Tensor:
        """Frames ``[3, T, H, W]`` of ``scene`` at its local times ``times [T]`` (frames shown)."""
        p = self.params
        s = self.scenes[scene]
        h, w = p.height, p.width
        t = times.to(torch.float32)[:, None, None]  # [T, 1, 1]
        limit = torch.tensor([h, w], dtype=torch.float32)[None] - s.size[:, None]  # [n, 2]
        corner = _bounce(s.start[None] + t * s.velocity[None], limit[None])  # [T, n, 2]
        half = s.size / 2
        centre = corner + half[None, :, None]
        yy = torch.arange(h, dtype=torch.float32)[None, None, :, None] + 0.5
        xx = torch.arange(w, dtype=torch.float32)[None, None, None, :] + 0.5
        dy = yy - centre[..., 0, None, None]  # [T, n, H, 1]
        dx = xx - centre[..., 1, None, None]  # [T, n, 1, W]
        r = half[None, :, None, None]
        square = torch.sigmoid((r - dy.abs()) / 0.6) * torch.sigmoid((r - dx.abs()) / 0.6)
        disc = torch.sigmoid((r - torch.sqrt(dy**2 + dx**2)) / 0.6)
        alpha = torch.where(s.disc[None, :, None, None], disc, square)  # [T, n, H, W]
        frames = s.background[:, None].expand(3, times.shape[0], h, w).clone()
        for i in range(alpha.shape[1]):  # later objects in front
            a = alpha[:, i][None]
            frames = frames * (1 - a) + s.colour[i][:, None, None, None] * a
        return frames

    def local_times(self, schedule: Sequence[int]) -> list[tuple[int, int]]:
        """``(scene, local time)`` of every frame of ``schedule`` (one scene index per block).

        A scene's clock advances one step per frame shown; a return starts by repeating the
        frame it was left on, so off-screen scenes are frozen."""
        f = self.params.frames_per_block
        clock: dict[int, int] = {}
        out: list[tuple[int, int]] = []
        previous = None
        for scene in schedule:
            if not 0 <= scene < self.params.num_scenes:
                raise ValueError(f"schedule: scene {scene} is not in [0, {self.params.num_scenes})")
            if scene != previous and scene in clock:
                clock[scene] -= 1  # repeat the last frame shown
            for _ in range(f):
                now = clock.get(scene, 0)
                out.append((scene, now))
                clock[scene] = now + 1
            previous = scene
        return out

    def render(self, schedule: Sequence[int]) -> torch.Tensor:
        """Pixels ``[3, len(schedule) * frames_per_block, H, W]`` of the video ``schedule`` films."""
        frames = self.local_times(schedule)
        out = torch.empty(3, len(frames), self.params.height, self.params.width)
        for scene in sorted({s for s, _ in frames}):
            idx = [i for i, (s, _) in enumerate(frames) if s == scene]
            times = torch.tensor([frames[i][1] for i in idx])
            out[:, idx] = self.render_scene(scene, times)
        return out


# ---------------------------------------------------------------------------------- schedules
def conditions(schedule: Sequence[int]) -> list[dict[str, int]]:
    """The engine's conditions schedule for ``schedule``: one ``{"from_block", "scene"}``
    segment per run of equal scenes."""
    out: list[dict[str, int]] = []
    for block, scene in enumerate(schedule):
        if not out or out[-1]["scene"] != scene:
            out.append({"from_block": block, "scene": int(scene)})
    return out


def schedule_from_conditions(segments: Sequence[Mapping[str, Any]], num_blocks: int) -> list[int]:
    """Scene index per block for a conditions schedule (the inverse of :func:`conditions`)."""
    out: list[int] = []
    for i, seg in enumerate(segments):
        end = segments[i + 1]["from_block"] if i + 1 < len(segments) else num_blocks
        out.extend([int(seg["scene"])] * max(0, min(end, num_blocks) - len(out)))
    return out[:num_blocks]


@attrs.frozen
class Return:
    """Block ``block`` cuts back to ``scene``, last shown in block ``last_block``."""

    block: int
    scene: int
    last_block: int

    @property
    def blocks_since(self) -> int:
        """Blocks since the scene was last seen (1 = it was on screen in the previous block)."""
        return self.block - self.last_block


def returns(schedule: Sequence[int]) -> list[Return]:
    """Every cut back to a scene shown before (not the first appearances)."""
    last: dict[int, int] = {}
    out: list[Return] = []
    for block, scene in enumerate(schedule):
        if block and schedule[block - 1] != scene and scene in last:
            out.append(Return(block, scene, last[scene]))
        last[scene] = block
    return out


def revisit_schedule(
    num_blocks: int,
    num_scenes: int,
    seed: int = 0,
    *,
    segment_blocks: tuple[int, int] = (1, 2),
    new_scene_probability: float = 0.5,
) -> list[int]:
    """A random schedule that keeps coming back to scenes after long absences.

    Segments last ``segment_blocks`` blocks (uniform); at each cut the next scene is a new one
    with ``new_scene_probability`` (while any is left), otherwise the scene unseen for the
    longest time — so absences grow with the number of scenes in play."""
    gen = torch.Generator().manual_seed(wrap_seed(seed * 1_000_033 + 17))
    lo, hi = segment_blocks
    order = torch.randperm(num_scenes, generator=gen).tolist()
    unseen = order[1:]
    schedule: list[int] = []
    scene = order[0]
    last: dict[int, int] = {}
    while len(schedule) < num_blocks:
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        schedule.extend([scene] * length)
        last[scene] = len(schedule) - 1
        others = [s for s in last if s != scene]
        if unseen and (len(last) < 2 or float(torch.rand(1, generator=gen)) < new_scene_probability):
            scene = unseen.pop(0)
        elif others:
            scene = min(others, key=lambda s: last[s])
        # else a world of one scene: it stays on screen
    return schedule[:num_blocks]


def recall_schedule(
    num_blocks: int, num_scenes: int, seed: int = 0, *, segment_blocks: tuple[int, int] = (1, 2)
) -> list[int]:
    """A training schedule where returns come from varied distances: first ``k`` new scenes of
    one block each (``k`` uniform in ``[2, min(num_scenes, num_blocks - 1)]``), then cuts to
    scenes drawn uniformly from those seen (never the one on screen), each on screen for
    ``segment_blocks`` blocks, so scenes also continue across block boundaries.

    Unlike :func:`revisit_schedule` (least recently seen first, so the distance back is
    predictable from the number of scenes in play) nothing but the scene itself tells where in
    the history its last visit is: a model learns to find it by its condition."""
    gen = torch.Generator().manual_seed(wrap_seed(seed * 1_000_037 + 29))
    lo, hi = segment_blocks
    order = torch.randperm(num_scenes, generator=gen).tolist()
    most = max(2, min(num_scenes, num_blocks - 1))
    k = int(torch.randint(2, most + 1, (1,), generator=gen)) if most > 2 else 2
    k = min(k, num_scenes)  # a world of one scene: it is all there is to show
    schedule: list[int] = []
    seen: list[int] = []
    while len(schedule) < num_blocks:
        if len(seen) < k:  # the new scenes, one block each
            scene = order[len(seen)]
            seen.append(scene)
            schedule.append(scene)
            continue
        choices = [s for s in seen if s != schedule[-1]] or seen  # one scene: it continues
        scene = choices[int(torch.randint(len(choices), (1,), generator=gen))]
        schedule.extend([scene] * int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    return schedule[:num_blocks]


def iter_blocks(pixels: torch.Tensor, frames_per_block: int) -> Iterator[torch.Tensor]:
    """Split ``pixels [3, T, H, W]`` into blocks ``[3, F, H, W]``."""
    for start in range(0, pixels.shape[1], frames_per_block):
        yield pixels[:, start : start + frames_per_block]
