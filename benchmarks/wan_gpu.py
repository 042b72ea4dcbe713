"""Wan2.1-1.3B at full size on one GPU: time, memory and cache management per policy.

The full-size Wan2.1-T2V-1.3B transformer (30 layers, 12 heads × 128, 832×480 → 60×104
latents, 3-frame blocks as Self-Forcing, its 4-step sampler + the clean pass) is built with
random weights directly on the GPU in bf16 (no checkpoint: the structure is what costs time and
memory). One script, one run, every section under a time cap so the whole finishes within
8 minutes of GPU time (470 s by default; 451 s on one H100 with it); results are rewritten after
every section, so an interrupted run keeps what it measured:

1. attention: SDPA as the engine calls it (the kernel it picks named), SDPA with each kernel
   forced (math / flash / efficient / cuDNN), xformers and flash-attn (when importable) on the
   real context shapes — one block's 4,680 queries over the PackForcing
   context, Self-Forcing's 21-frame window and the full cache at 60 s;
2. per policy (packforcing, sliding_window, sink_recent, full): per-block wall time early vs
   late, blocks/s and latent frames/s against real time (16 fps = 4 latent frames/s),
   ``torch.cuda.max_memory_allocated`` and the cache bytes held (checked against ``plan``)
   against video length — PackForcing to 120 s, the full cache until it runs out of memory;
3. the cache-management share of a PackForcing block at a full cache (compress, select,
   gather + realign, bookkeeping), from the instrumented engine;
4. the per-layer copy of the whole context into one tensor at the PackForcing shape, against
   attention over the stored parts merged by their log-sum-exp (no copy of the stored runs;
   checked equal): three parts as a split context makes them, and one part per block, per
   block and as a share of the measured PackForcing block time;
5. the share sections again with the top-K made once per pass (``shares_per_pass``) and with the
   context split (``shares_split``: ``backend.split_context``).

    python benchmarks/wan_gpu.py [--out benchmarks/results] [--budget 470]
    python benchmarks/wan_gpu.py --only packforcing,sliding_window,shares --budget 200   # a short re-measurement
    python benchmarks/wan_gpu.py --smoke --out /tmp/x     # the same code paths on the CPU, tiny model

Writes ``wan_gpu.json`` and ``wan_gpu.md`` in ``--out`` and prints the tables at the end.
``--only`` runs just the named sections (``attention``, the policies, ``shares``) and writes
``wan_gpu_<sections>.{json,md}`` instead, so a short run never overwrites the full results.
The shares section also counts the host-device synchronisations of one block
(:class:`~packforcing.core.instrument.HostSyncCounter`, in an extra untimed block).
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, machine, markdown_table, median_time  # noqa: E402

import packforcing as pf  # noqa: E402
from packforcing.attention.backends import SdpaBackend  # noqa: E402
from packforcing.attention.merge import merge_by_lse  # noqa: E402
from packforcing.core.instrument import HostSyncCounter, SectionTimer, timing_wrapper  # noqa: E402
from packforcing.core.interfaces import AttentionContext  # noqa: E402
from packforcing.core.rope import Rope3D  # noqa: E402
from packforcing.core.sampler import block_noise, fresh_noise  # noqa: E402
from packforcing.models.wan.params import WAN21_T2V_1_3B  # noqa: E402
from packforcing.plugins import ComponentFactory, hookimpl  # noqa: E402
from packforcing.plugins.factory import no_params  # noqa: E402
from packforcing.plugins.manager import Registry  # noqa: E402
from packforcing.positional import TemporalRopeShift  # noqa: E402

REAL_TIME_LATENT_FPS = 4.0
"""Self-Forcing's "real time": 16 pixel frames/s = 4 latent frames/s."""

TINY = {
    **WAN21_T2V_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "in_channels": 16,
    "out_channels": 16,
}


@attrs.frozen
class Sizes:
    """One run's scale: the real GPU run or the CPU smoke run of the same code paths."""

    device: str
    dtype: torch.dtype
    transformer: dict[str, Any]
    latent: tuple[int, int]
    text_tokens: int
    max_blocks: dict[str, int]
    caps: dict[str, float]
    """Seconds per section (the run also stops at the global budget)."""
    attention_contexts: dict[str, int]
    """Key counts (history tokens + the block itself) of the attention section."""
    steady_extra_blocks: int
    timed_blocks: int
    mid_blocks: int
    """PackForcing's mid bank (compressed blocks), of which ``top_k`` enter attention."""
    top_k: int
    memory_marks: tuple[float, ...]
    """Video lengths (s) of the memory table."""
    memory_cap_bytes: int | None = None
    """``--memory-gib``: the allocator's limit (``torch.cuda.set_per_process_memory_fraction``), so
    a larger card runs out where a smaller one would (an H200 as an 80 GB H100); ``None``: the card's."""

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


FRAMES_PER_BLOCK = 3
CALLS_PER_BLOCK = 5
"""Model calls per block: Self-Forcing's 4 sampler steps and the clean pass."""
GPU = Sizes(
    device="cuda",
    dtype=torch.bfloat16,
    transformer=WAN21_T2V_1_3B,
    latent=(60, 104),
    text_tokens=512,
    # 120 s at 16 fps = 1,920 pixel frames ≤ 1 + 4·(483 - 1): 161 blocks of 3 latent frames
    max_blocks={"packforcing": 161, "sliding_window": 24, "sink_recent": 24, "full": 400},
    caps={
        "attention": 45,
        "packforcing": 110,
        "sliding_window": 25,
        "sink_recent": 25,
        "shares": 60,
        "shares_per_pass": 60,
        "shares_split": 60,
        # on one H100 (92e9ac0) the full cache ran out of memory in its 89th block, 196 s in
        # (4.0 s per block at the end): 235 s covers that, and the whole run took 451 s of 470
        "full": 235,
    },
    attention_contexts={"self_forcing_window_21f": 21 * 1560, "full_60s": 240 * 1560 + 3 * 1560},
    steady_extra_blocks=2,
    timed_blocks=6,
    mid_blocks=16,
    top_k=8,
    memory_marks=(10, 30, 60, 90, 120),
)
SMOKE = Sizes(
    device="cpu",
    dtype=torch.float32,
    transformer=TINY,
    latent=(8, 16),
    text_tokens=8,
    max_blocks={"packforcing": 10, "sliding_window": 3, "sink_recent": 3, "full": 4},
    caps={
        "attention": 10,
        "packforcing": 30,
        "sliding_window": 10,
        "sink_recent": 10,
        "shares": 20,
        "shares_per_pass": 20,
        "shares_split": 20,
        "full": 20,
    },
    attention_contexts={"self_forcing_window_21f": 21 * 32, "full_60s": 64 * 32},
    steady_extra_blocks=1,
    timed_blocks=2,
    mid_blocks=2,
    top_k=1,
    memory_marks=(1, 2, 4, 8),
)


class Budget:
    """The whole script's wall-clock budget; each section gets ``min(cap, what is left)``."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())

    def cap(self, seconds: float) -> float:
        return min(seconds, self.left())


SINK_SHIFT = 24.0
"""Frames the ``copy`` section moves the sink by (PackForcing at 120 s of 3-frame blocks moves it
by hundreds; any shift costs the same)."""
POLICIES = ("packforcing", "sliding_window", "sink_recent", "full")
SHARES: dict[str, dict[str, dict[str, Any]]] = {
    "shares": {},
    "shares_per_pass": {"selector": {"shared_across_layers": True}},
    "shares_split": {"backend": {"split_context": True}},
}
"""The cache-management share sections, as changes to the PackForcing preset's config sections:
the preset itself; its top-K selection made once per forward pass (``selector.shared_across_layers``)
instead of per layer; and its context split (``backend.split_context``: the stored runs attended
where they are and merged by log-sum-exp, no per-layer copy of the whole context)."""
SECTIONS = ("attention", "copy", *POLICIES, *SHARES)


def parse_only(value: str) -> tuple[str, ...]:
    """``--only a,b``: known section names, in run order."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or value!r}; choose from {', '.join(SECTIONS)}")
    return tuple(n for n in SECTIONS if n in names)


class Results:
    """Accumulated results, rewritten as JSON + markdown after every section."""

    def __init__(self, out: Path, sizes: Sizes, stem: str = "wan_gpu") -> None:
        self.out = out
        self.stem = stem
        self.data: dict[str, Any] = {"benchmark": "wan_gpu", "machine": machine(), "sections": {}}
        self.tables: dict[str, str] = {}
        self.sizes = sizes

    def add(self, name: str, data: Any, *tables: str) -> None:
        self.data["sections"][name] = data
        self.tables[name] = "\n".join(tables)
        self.write()

    def text(self) -> str:
        order = ("attention", "copy", "policies", *SHARES)
        return "\n".join(self.tables[k] for k in sorted(self.tables, key=lambda k: order.index(k) if k in order else 9))

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        head = f"### {self.stem}\n\nMachine: {self.data['machine']}\n\n"
        (self.out / f"{self.stem}.md").write_text(head + self.text())


def sync(sizes: Sizes) -> None:
    if sizes.cuda:
        torch.cuda.synchronize()


def free_memory(sizes: Sizes) -> None:
    gc.collect()
    if sizes.cuda:
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---- attention backends ------------------------------------------------------------------


def _sdpa(kernel: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[kernel]

    def attend(q, k, v):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
        return out.transpose(1, 2)

    return attend


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel ``scaled_dot_product_attention`` picks for ``[B, N, H, D]`` tensors when free to."""
    from torch.nn.attention import SDPBackend

    choice = int(torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
    names = {int(getattr(SDPBackend, n)): n.lower() for n in dir(SDPBackend) if n.isupper()}
    return names.get(choice, str(choice))


def attention_backends(sizes: Sizes) -> dict[str, Callable | str]:
    """Name → ``attend(q, k, v)`` over ``[B, N, H, D]``, or the reason it is unavailable."""
    found: dict[str, Callable | str] = {"sdpa_default": SdpaBackend().attend}  # what the engine calls
    kernels = ("math", "flash", "efficient", "cudnn") if sizes.cuda else ("math",)
    for kernel in kernels:
        found[f"sdpa_{kernel}"] = _sdpa(kernel)
    try:
        import xformers.ops as xops

        if not sizes.cuda:
            raise ImportError("CPU run")
        found["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)
    except Exception as exc:  # ImportError, or a build that does not match this torch
        found["xformers"] = f"unavailable: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    try:
        from flash_attn import flash_attn_func

        if not sizes.cuda:
            raise ImportError("CPU run")
        found["flash_attn"] = lambda q, k, v: flash_attn_func(q, k, v)
    except Exception as exc:
        found["flash_attn"] = f"unavailable: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    return found


def timed(fn: Callable[[], Any], sizes: Sizes, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn`` (CUDA events on the GPU)."""
    return median_time(fn, sizes.cuda, warmup=warmup, repeats=repeats)


def attention_section(sizes: Sizes, contexts: dict[str, int], heads: int, head_dim: int, cap: float) -> dict:
    nq = contexts.pop("_queries")
    backends = attention_backends(sizes)
    rows = []
    started = time.perf_counter()
    gen = torch.Generator(device=sizes.device).manual_seed(0)
    for label, nk in contexts.items():
        q = torch.randn(1, nq, heads, head_dim, device=sizes.device, dtype=sizes.dtype, generator=gen)
        k = torch.randn(1, nk, heads, head_dim, device=sizes.device, dtype=sizes.dtype, generator=gen)
        v = torch.randn_like(k)
        flops = 4 * nq * nk * heads * head_dim
        reference = None
        for name, fn in backends.items():
            row: dict[str, Any] = {"context": label, "queries": nq, "keys": nk, "backend": name}
            if name == "sdpa_default":  # the kernel SDPA picks by itself for these tensors
                row["backend"] = f"sdpa_default ({sdpa_choice(q, k, v)})"
            if isinstance(fn, str):
                row["error"] = fn
            elif time.perf_counter() - started > cap:
                row["error"] = "skipped: section time cap reached"
            else:
                try:
                    out = fn(q, k, v)
                    seconds = timed(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), sizes, repeats=3 if nk > 100_000 else 5)
                    out = out.float()
                    if reference is None:
                        reference, row["reference"] = out, True
                    row.update(
                        ms=seconds * 1e3,
                        tflops=flops / seconds / 1e12,
                        max_abs_diff=float((out - reference).abs().max()),
                    )
                    del out
                except Exception as exc:  # OOM, or a kernel that refuses these shapes/dtype
                    row["error"] = (
                        "OOM" if is_oom(exc) else type(exc).__name__
                    ) + f": {' '.join(str(exc).split())[:100]}"
                    free_memory(sizes)
            rows.append(row)
        del q, k, v, reference
        free_memory(sizes)
    return {"rows": rows}


def attention_table(data: dict) -> str:
    rows = [
        [
            r["context"],
            r["keys"],
            r["backend"],
            r.get("ms", "-"),
            r.get("tflops", "-"),
            r.get("max_abs_diff", r.get("error", "-")),
        ]
        for r in data["rows"]
    ]
    return "Attention, one block's queries (bf16 on GPU):\n\n" + markdown_table(
        ["context", "keys", "backend", "ms", "TFLOP/s", "max |diff| vs first / error"], rows
    )


# ---- the per-layer context copy, and attention without it ---------------------------------


def copy_section(
    sizes: Sizes, *, sink: int, picks: int, recent: int, tpb: int, pool: int, heads: int, head_dim: int
) -> dict:
    """One layer of a PackForcing forward at the real shapes (``sink`` and ``recent`` blocks of
    ``tpb`` tokens, ``picks`` mid blocks of ``pool`` tokens, the block itself), attention by the
    ``sdpa`` backend three ways:

    - gathered: the per-layer copy of the whole context into one tensor, then one call;
    - split (``backend.split_context``, what the context does): the sink's and the recent
      blocks' stored runs attended in place, the sink's with the query moved instead of its
      keys, the picks and the block copied together, the three parts merged by log-sum-exp;
    - pieces: every block attended on its own and the parts merged (the first copy-free try).

    The sink moves by ``SINK_SHIFT`` frames: the gathered copy rotates its keys (``rotate_ms``),
    the split moves the query; the three outputs are compared.
    """
    gen = torch.Generator(device=sizes.device).manual_seed(1)
    backend = SdpaBackend()
    rope = Rope3D(head_dim)
    realigner = TemporalRopeShift()
    shift = torch.tensor([SINK_SHIFT], dtype=torch.float64, device=sizes.device)

    def rand(n: int) -> torch.Tensor:  # stored as the cache stores it: [B, N, H, D]
        return torch.randn(1, n, heads, head_dim, device=sizes.device, dtype=sizes.dtype, generator=gen)

    def pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rand(n), rand(n)

    q = rand(tpb)
    sink_run, recent_run = pair(sink * tpb), pair(recent * tpb)  # a tier's page: its blocks adjacent
    mids = [pair(pool) for _ in range(picks)]
    own = pair(tpb)

    def each(run: tuple[torch.Tensor, torch.Tensor], count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(run[0][:, i * tpb : (i + 1) * tpb], run[1][:, i * tpb : (i + 1) * tpb]) for i in range(count)]

    blocks = [*each(sink_run, sink), *mids, *each(recent_run, recent), own]

    sink_tokens = sink * tpb
    sink_deltas = torch.full((sink_tokens,), SINK_SHIFT, dtype=torch.float64, device=sizes.device)

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([k for k, _ in blocks], 1), torch.cat([v for _, v in blocks], 1)

    def rotate(keys: torch.Tensor) -> torch.Tensor:  # the sink's keys moved, as gather_shifted does
        return rope.shift_temporal_tokens_(keys[:, :sink_tokens], sink_deltas)

    shifter = realigner.query_shifter(shift, rope)  # made once per pass by the context

    def rest() -> tuple[torch.Tensor, torch.Tensor]:  # the split's only copy: the picks and the block
        return torch.cat([*(k for k, _ in mids), own[0]], 1), torch.cat([*(v for _, v in mids), own[1]], 1)

    def split_parts() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(shifter(q), *sink_run), (q, *recent_run), (q, *rest())]

    def split() -> torch.Tensor:
        return merge_by_lse([backend.attend_lse(*part) for part in split_parts()])

    def pieces(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # over the moved keys' blocks
        bounds = itertools.accumulate([k.shape[1] for k, _ in blocks], initial=0)
        spans = list(itertools.pairwise(bounds))
        return merge_by_lse([backend.attend_lse(q, keys[:, a:b], values[:, a:b]) for a, b in spans])

    keys, values = gather()
    rotate(keys)
    gathered_out = backend.attend(q, keys, values).float()
    scratch, _ = gather()
    parts = split_parts()
    attended = [backend.attend_lse(*part) for part in parts]
    return {
        "pieces_tokens": [k.shape[1] for k, _ in blocks],
        "queries": tpb,
        "sink_shift": SINK_SHIFT,
        "copy_ms": timed(gather, sizes) * 1e3,
        "rotate_ms": timed(lambda: rotate(scratch), sizes) * 1e3,
        "attend_gathered_ms": timed(lambda: backend.attend(q, keys, values), sizes) * 1e3,
        "attend_split_ms": timed(split, sizes) * 1e3,
        # the split's steps on their own: what it pays instead of the copy and the sink's rotation
        "split_query_move_ms": timed(lambda: shifter(q), sizes) * 1e3,
        "split_copy_ms": timed(rest, sizes) * 1e3,
        "split_attend_ms": timed(lambda: [backend.attend_lse(*part) for part in parts], sizes) * 1e3,
        "split_merge_ms": timed(lambda: merge_by_lse(attended), sizes) * 1e3,
        "attend_merged_ms": timed(lambda: pieces(keys, values), sizes) * 1e3,
        "max_abs_diff": float((pieces(keys, values).float() - gathered_out).abs().max()),
        "split_max_abs_diff": float((split().float() - gathered_out).abs().max()),
    }


SPLIT_STEPS = {
    "split_query_move_ms": "query moved",
    "split_copy_ms": "picks + block copied",
    "split_attend_ms": "3 attention calls",
    "split_merge_ms": "merge by log-sum-exp",
}


def copy_table(data: dict, layers: int, calls_per_block: int, block_ms: float | None) -> str:
    per_block = layers * calls_per_block
    keys = ("copy_ms", "rotate_ms", "attend_gathered_ms", "attend_split_ms", "attend_merged_ms")
    copy, rotate, gathered, split, merged = (data[k] * per_block for k in keys)
    share = f"{100 * copy / block_ms:.2f} %" if block_ms else "-"
    steps = [k for k in SPLIT_STEPS if k in data]  # absent from results written before they were timed
    breakdown = (
        "\n\nThe split's steps timed on their own (ms/block; their sum against the split's "
        "ms/block above shows what the calls overlap or lose between them):\n\n"
        + markdown_table(
            [*(f"{SPLIT_STEPS[k]} ms/block" for k in steps), "sum ms/block"],
            [[*(data[k] * per_block for k in steps), sum(data[k] for k in steps) * per_block]],
        )
        if steps
        else ""
    )
    return (
        f"Per-layer context copy at the PackForcing shape ({data['queries']} queries over blocks of "
        f"{data['pieces_tokens']} tokens, the sink moved by {data['sink_shift']:g} frames), x {layers} layers "
        f"x {calls_per_block} model calls per block:\n\n"
        + markdown_table(
            [
                "copy ms/block",
                "copy share of a block",
                "sink rotation ms/block",
                "copy + rotation + attention ms/block",
                "split (3 parts, query moved) ms/block",
                "per-block pieces ms/block",
                "max |split - gathered|",
                "max |pieces - gathered|",
            ],
            [
                [
                    copy,
                    share,
                    rotate,
                    copy + rotate + gathered,
                    split,
                    merged,
                    data["split_max_abs_diff"],
                    data["max_abs_diff"],
                ]
            ],
        )
        + breakdown
    )


def add_copy_table(results: Results, layers: int) -> None:
    """(Re)write the ``copy`` section's table, its shares against the latest PackForcing block
    time measured in this run: the ``packforcing`` policy's late blocks, else the preset's
    unperturbed block of the ``shares`` section (none yet: the table without shares)."""
    sections = results.data["sections"]
    copy = sections.get("copy") or {}
    if not copy or "error" in copy:
        return
    block_ms = (sections.get("policies") or {}).get("packforcing", {}).get("late_ms")
    if block_ms is None:
        block_ms = ((sections.get("shares") or {}).get("unperturbed") or {}).get("block_ms")
    results.add("copy", copy, copy_table(copy, layers, CALLS_PER_BLOCK, block_ms))


# ---- the model ---------------------------------------------------------------------------


def random_wan(sizes: Sizes) -> Any:
    """packforcing's ``wan`` model around diffusers' ``WanTransformer3DModel`` with random weights,
    initialised directly on the device (no CPU copy, no checkpoint) and cast like
    ``from_pretrained(torch_dtype=...)`` (diffusers' float32 modules stay float32)."""
    from diffusers import WanTransformer3DModel

    from packforcing.models.wan.adapter import WanBlockModel, _cast, _targets
    from packforcing.models.wan.params import WanParams

    torch.manual_seed(0)
    with torch.device(sizes.device):
        transformer = WanTransformer3DModel(**sizes.transformer)
    _cast(transformer, _targets(transformer, sizes.dtype))
    transformer.requires_grad_(False).eval()
    height, width = sizes.latent
    params = WanParams(frames_per_block=FRAMES_PER_BLOCK, latent_height=height, latent_width=width)
    return WanBlockModel(transformer, params, sizes.dtype)


class SharedModel:
    """A plugin providing model ``wan_benchmark``: the one prebuilt model every engine shares."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @hookimpl
    def packforcing_models(self) -> dict[str, ComponentFactory]:
        return {"wan_benchmark": no_params(lambda env: self.model, "the benchmark's prebuilt random Wan")}


def prompt_embeds_file(sizes: Sizes, folder: Path) -> Path:
    """A random ``prompt_embeds [L, text_dim]`` safetensors file (the text condition)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(sizes.text_tokens, sizes.transformer["text_dim"], generator=gen).to(sizes.dtype)
    path = folder / "prompt_embeds.safetensors"
    save_file({"prompt_embeds": embeds}, str(path))
    return path


# ---- engines -----------------------------------------------------------------------------


PRESET = ROOT / "configs" / "wan2.1-1.3b" / "packforcing.yaml"


def policy_blocks(sizes: Sizes) -> dict[str, dict[str, Any]]:
    """The compared caches at 3-frame blocks: the shipped PackForcing preset
    (``configs/wan2.1-1.3b/packforcing.yaml``: sink 6 frames, 16 mid blocks pooled 4,680 → 91
    tokens of which the top 8 enter, recent 6 frames; the mid bank and ``k`` scaled down in the
    smoke run), Self-Forcing's 21-frame window (``self_forcing.yaml``), LongLive's sink of 3 frames
    + 12-frame window, and the full cache."""
    import yaml

    preset = yaml.safe_load(PRESET.read_text())
    packforcing = {key: dict(preset[key]) for key in ("policy", "compressor", "selector", "realigner")}
    packforcing["policy"]["mid_capacity_blocks"] = sizes.mid_blocks
    packforcing["selector"]["k"] = sizes.top_k
    fpb = FRAMES_PER_BLOCK
    return {
        "packforcing": packforcing,
        "sliding_window": {"policy": {"name": "sliding_window", "window_frames": 21 - fpb}},
        "sink_recent": {"policy": {"name": "sink_recent", "sink_frames": fpb, "window_frames": 12 - 2 * fpb}},
        "full": {"policy": {"name": "full"}},
    }


def pf_preset_mid_tokens(sizes: Sizes, g: Any) -> int:
    """Tokens of one pooled mid block under the PackForcing preset's ``pool`` window."""
    window = policy_blocks(sizes)["packforcing"]["compressor"].get("window", (2, 4, 4))
    t, h, w = g.block_grid
    return max(1, t // window[0]) * max(1, h // window[1]) * max(1, w // window[2])


def video_seconds(blocks: int, fps: float = 16.0, temporal_stride: int = 4) -> float:
    """Seconds of pixels decoded from ``blocks`` blocks (Wan's causal VAE: 1 + 4(F - 1) frames)."""
    latent = blocks * FRAMES_PER_BLOCK
    return (1 + temporal_stride * (latent - 1)) / fps if latent else 0.0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan


def predict_oom(
    rows: list[dict[str, Any]], usable: int, plan_bytes: Callable[[int], int], horizon: int = 1000
) -> int | None:
    """The number of blocks a policy completes before one would need more than ``usable`` bytes
    allocated, from its measured blocks and its cache plan; ``None`` if none within ``horizon``
    more blocks.

    Block ``n``'s peak is modelled as ``max(plan(n) + P(n), plan(n + 1) + C)``: its passes run
    over the cache held before it (``plan(n)``: bytes after ``n`` blocks) plus a transient ``P``
    (weights, activations and, for a copied context, the per-layer copy, which grows with the
    context), and its commit holds the cache after it plus a constant ``C``. ``P`` is fitted as a
    line through the last (up to 8) measured blocks that allocated no cache (their peak over the
    cache they hold); ``C`` is the peak over the cache at the last block that allocated some (an
    upper bound of ``C``). Each row needs ``block``, ``plan_bytes`` (after it) and ``block_peak``
    (that block's own ``max_memory_allocated``).

    ``usable`` counts what the allocator holds as free, and the model does not see fragmentation:
    on one H100 the full cache stopped a block sooner than predicted (88 blocks, not 89) when its
    3.21 GiB page found 2.78 GiB free on the card and 1.40 GiB reserved in smaller pieces."""
    steady = [r for prev, r in itertools.pairwise(rows) if r["plan_bytes"] == prev["plan_bytes"]][-8:]
    if len(steady) < 2:
        return None
    xs = [float(r["block"]) for r in steady]
    ys = [float(r["block_peak"] - r["plan_bytes"]) for r in steady]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    grew = [r for prev, r in itertools.pairwise(rows) if r["plan_bytes"] != prev["plan_bytes"]]
    commit = grew[-1]["block_peak"] - grew[-1]["plan_bytes"] if grew else 0
    start = rows[-1]["block"] + 1
    for n in range(start, start + horizon):
        passes = plan_bytes(n) + my + slope * (n - mx)
        if max(passes, plan_bytes(n + 1) + commit) > usable:
            return n
    return None


def run_policy(engine: Any, sizes: Sizes, *, cap: float, max_blocks: int, conditions: list[dict]) -> dict:
    """Generate until ``max_blocks``, the time cap or out of memory; one row per block (its own
    peak allocation, ``block_peak``, and the run's so far, ``max_allocated``)."""
    rows: list[dict[str, Any]] = []
    if sizes.cuda:
        free_memory(sizes)
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if sizes.cuda else 0
    # what allocations can reach: the device's free memory plus what the allocator holds already
    usable = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() if sizes.cuda else 0
    if sizes.memory_cap_bytes is not None:
        usable = min(usable, sizes.memory_cap_bytes)
    stopped, error = "max_blocks", None
    started = time.perf_counter()
    peak = 0
    try:
        with engine.session(seed=0, batch_size=1, conditions=conditions) as session:
            for index in range(max_blocks):
                if time.perf_counter() - started > cap:
                    stopped = "time cap"
                    break
                if sizes.cuda:
                    torch.cuda.reset_peak_memory_stats()
                block = session.step()
                block_peak = torch.cuda.max_memory_allocated() if sizes.cuda else 0
                peak = max(peak, block_peak)
                rows.append(
                    {
                        "block": index,
                        "seconds": block.seconds,
                        "video_seconds": video_seconds(index + 1),
                        "context_tokens": block.context_tokens,
                        "cache_bytes": block.stats.bytes,
                        "plan_bytes": engine.policy.plan(index + 1).bytes,
                        "block_peak": block_peak,
                        "max_allocated": peak,
                    }
                )
    except Exception as exc:  # out of memory is a result; anything else is recorded, and the run goes on
        stopped = "OOM" if is_oom(exc) else f"error ({type(exc).__name__})"
        error = " ".join(str(exc).split())[:300]
    free_memory(sizes)
    predicted = None
    if sizes.cuda and stopped not in ("OOM", "max_blocks") and rows:  # cut short: would it have fit?
        plan = functools.cache(lambda n: engine.policy.plan(n).bytes)
        predicted = predict_oom(rows, usable, plan, horizon=max_blocks - len(rows))
    times = [r["seconds"] for r in rows]
    early, late = median(times[1:6]), median(times[-5:])
    return {
        "blocks": len(rows),
        "video_seconds": video_seconds(len(rows)),
        "stopped": stopped,
        "error": error,
        "baseline_allocated": baseline,
        "usable_bytes": usable,
        "memory_cap_bytes": sizes.memory_cap_bytes,
        "early_ms": early * 1e3,
        "late_ms": late * 1e3,
        "late_over_early": late / early if early else math.nan,
        "blocks_per_second_late": 1 / late if late else math.nan,
        "latent_frames_per_second_late": FRAMES_PER_BLOCK / late if late else math.nan,
        "real_time_factor_late": FRAMES_PER_BLOCK / late / REAL_TIME_LATENT_FPS if late else math.nan,
        "peak_allocated": peak,
        "final_cache_bytes": rows[-1]["cache_bytes"] if rows else 0,
        "cache_equals_plan": all(r["cache_bytes"] == r["plan_bytes"] for r in rows),
        "predicted_oom_blocks": predicted,
        "predicted_oom_video_seconds": video_seconds(predicted) if predicted else None,
        "rows": rows,
    }


def stopped_by(run: dict[str, Any]) -> str:
    """What ended a policy's run, with where it ran (or would run) out of memory."""
    cap = run.get("memory_cap_bytes")
    limit = f", allocator capped at {cap / 2**30:.1f} GiB" if cap else ""
    if run["stopped"] == "OOM":
        done = run["blocks"]
        return f"out of memory in block {done + 1}, after {done} blocks ({run['video_seconds']:.1f} s{limit})"
    if run.get("predicted_oom_blocks"):
        blocks = run["predicted_oom_blocks"]
        return f"{run['stopped']} (predicted out of memory after {blocks} blocks, {video_seconds(blocks):.1f} s{limit})"
    return run["stopped"]


def policy_table(runs: dict[str, dict]) -> str:
    rows = [
        [
            name,
            r["blocks"],
            r["video_seconds"],
            stopped_by(r),
            r["early_ms"],
            r["late_ms"],
            r["late_over_early"],
            r["blocks_per_second_late"],
            r["real_time_factor_late"],
            r["peak_allocated"] / 2**30,
            r["final_cache_bytes"] / 2**30,
            r["cache_equals_plan"],
        ]
        for name, r in runs.items()
    ]
    return "Per policy (3-frame blocks, 4 sampler steps + the clean pass per block):\n\n" + markdown_table(
        [
            "policy",
            "blocks",
            "video s",
            "stopped by",
            "early ms/block",
            "late ms/block",
            "late/early",
            "blocks/s (late)",
            "x real time (late)",
            "max allocated GiB",
            "cache GiB (end)",
            "cache == plan",
        ],
        rows,
    )


def memory_table(runs: dict[str, dict], marks: tuple[float, ...]) -> str:
    """``max_memory_allocated`` and cache bytes at given video lengths."""
    rows = []
    for name, r in runs.items():
        cells: list[Any] = [name]
        for second in marks:
            hit = [row for row in r["rows"] if row["video_seconds"] >= second]
            if hit:
                cells.append(f"{hit[0]['max_allocated'] / 2**30:.2f} / {hit[0]['cache_bytes'] / 2**30:.2f}")
            else:
                cells.append(r["stopped"] if r["stopped"] == "OOM" else "-")
        rows.append(cells)
    return "Max allocated / cache GiB against video length (first block reaching it):\n\n" + markdown_table(
        ["policy", *(f"{s:g} s" for s in marks)], rows
    )


class FixedContext(AttentionContext):
    """A context of ``T`` fixed history tokens per layer: the same attention work as a cache of
    ``T`` tokens with no cache management at all (the reference for the unperturbed share).

    Each layer's keys and values live in one preallocated ``[B, T + N, H, D]`` buffer whose last
    ``N`` rows take the block's own K/V on every call, as a fixed-size KV cache (Self-Forcing's)
    works: the reference copies only the block's tokens, never the history."""

    def __init__(
        self, backend: Any, keys: list[torch.Tensor], values: list[torch.Tensor], position: float, block_tokens: int
    ) -> None:
        self._backend, self._keys, self._values, self._position = backend, keys, values, position
        self._history = keys[0].shape[1] - block_tokens

    @property
    def position(self) -> float:
        return self._position

    @property
    def context_tokens(self) -> int:
        return self._history

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self._keys[layer], self._values[layer]
        keys[:, self._history :].copy_(k)
        values[:, self._history :].copy_(v)
        return self._backend.attend(q, keys, values)


def fixed_context_block(engine: Any, sizes: Sizes, tokens: int, position: float, conditions) -> Callable[[], None]:
    """One block's model work (the sampler's steps + the clean pass) over a :class:`FixedContext`
    of ``tokens`` history tokens, as a callable: PackForcing's block minus its cache."""
    model, g = engine.model, engine.geometry
    gen = torch.Generator(device=sizes.device).manual_seed(0)
    shape = (1, tokens + g.tokens_per_block, g.num_heads, g.head_dim)
    keys = [torch.randn(shape, generator=gen, device=sizes.device, dtype=sizes.dtype) for _ in range(g.num_layers)]
    values = [torch.randn(shape, generator=gen, device=sizes.device, dtype=sizes.dtype) for _ in range(g.num_layers)]
    context = FixedContext(engine.policy.backend, keys, values, position, g.tokens_per_block)
    spec = {k: v for k, v in conditions[0].items() if k != "from_block"}
    condition = engine.encode_condition(spec)
    shape = engine.block_shape(1)
    clean = torch.randn(shape, generator=gen, device=sizes.device, dtype=sizes.dtype)

    @torch.no_grad()
    def block() -> None:
        noise = block_noise(0, 0, shape, engine.dtype, engine.device)
        fresh = fresh_noise(0, 0, shape, engine.dtype, engine.device)
        engine.sampler.sample(noise, lambda x, t: model.denoise(x, t, context, condition=condition), fresh)
        model.clean_kv(clean, context, condition=condition)

    return block


def fixed_context_block_seconds(block: Callable[[], None], sizes: Sizes, blocks: int) -> float:
    """Median seconds of ``blocks`` calls of :func:`fixed_context_block` (after one warm-up)."""
    times = []
    for _ in range(blocks + 1):
        sync(sizes)
        t0 = time.perf_counter()
        block()
        sync(sizes)
        times.append(time.perf_counter() - t0)
    return median(times[1:])


def profile_block(block: Callable[[], Any], sizes: Sizes) -> dict[str, Any]:
    """What one block launches (``torch.profiler``): operators called from Python, GPU kernels,
    their summed time and the costliest kernels. Kernel time is exact; the wall time is inflated
    by the profiler. Comparing the kernel time of a PackForcing block with a fixed-context one
    separates device work from host-side cost (launches, Python)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sizes.cuda else [])
    sync(sizes)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        block()
        sync(sizes)
    wall = time.perf_counter() - started
    events = prof.events()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ops = sum(
        1
        for e in events
        if e.device_type == cpu
        and e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    attention_calls = sum(
        1
        for e in events
        if e.device_type == cpu
        and (e.name == "aten::scaled_dot_product_attention" or e.name.startswith("aten::_scaled_dot_product_"))
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    kernels: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == cuda:
            entry = kernels.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    return {
        "profiled_wall_ms": wall * 1e3,
        "operators": ops,
        "attention_calls": attention_calls,
        "kernel_launches": int(sum(c for c, _ in kernels.values())),
        "kernel_ms": sum(t for _, t in kernels.values()) / 1e3,
        "top_kernels": [{"name": kernel_label(name), "count": int(c), "ms": t / 1e3} for name, (c, t) in top],
        "kernels": {name[:400]: [int(c), t / 1e3] for name, (c, t) in kernels.items()},
    }


def kernel_label(name: str, width: int = 110) -> str:
    """A kernel's name shortened for a table: PyTorch's elementwise kernels are told apart by the
    functor deep inside their template arguments, so keep that part."""
    for marker in ("Functor", "_kernel_cuda", "copy_kernel", "Reduce", "index", "sort", "cat", "scatter", "gather"):
        at = name.find(marker)
        if at > width // 2:
            start = max(0, at - width // 2)
            return (name[:28] + " … " + name[start : start + width - 31]).replace("|", "/")
    return name[:width].replace("|", "/")


def kernel_differences(profiled: dict, rows: int = 15) -> list[list[Any]]:
    """Kernels by the time the PackForcing block spends in them beyond the fixed-context block:
    ``[label, extra launches, extra ms]``, largest first."""
    pf, fixed = profiled["packforcing"]["kernels"], profiled["fixed_context"]["kernels"]
    diff = []
    for name in set(pf) | set(fixed):
        c1, t1 = pf.get(name, (0, 0.0))
        c0, t0 = fixed.get(name, (0, 0.0))
        diff.append([kernel_label(name), c1 - c0, t1 - t0])
    return sorted(diff, key=lambda r: -r[2])[:rows]


def shares_section(engine: Any, timer: SectionTimer, sizes: Sizes, *, warm: int, cap: float, conditions) -> dict:
    """Cache-management share of block time at a full PackForcing cache: from the instrumented
    engine (sections synchronised, which exposes every host-side cost), and unperturbed — the
    same engine's blocks timed without section syncs against the same model work over a fixed
    context of as many tokens (:func:`fixed_context_block_seconds`)."""
    started = time.perf_counter()
    measured: list[float] = []
    with engine.session(seed=0, batch_size=1, conditions=conditions) as session:
        for _ in range(warm):
            if time.perf_counter() - started > cap:
                break
            session.step()
        timer.reset()
        for _ in range(sizes.timed_blocks):
            if time.perf_counter() - started > cap and measured:
                break
            measured.append(session.step().seconds)
        total = sum(measured)
        parts = timer.breakdown(total)
        seconds = dict(timer.seconds)
        syncs = None
        plain: list[float] = []
        tokens, position = 0, 0.0
        if time.perf_counter() - started < cap:
            with HostSyncCounter() as counter:
                session.step()
            syncs = {"reads": dict(counter.reads), "writes": dict(counter.writes), "total": counter.total}
            timer.sync = False  # the wrappers now only read the clock
            for _ in range(sizes.timed_blocks):
                if time.perf_counter() - started > cap and plain:
                    break
                block = session.step()
                plain.append(block.seconds)
                tokens = block.context_tokens
            position = engine.policy.context(engine.query(session.blocks_done)).position
        profiled: dict[str, Any] = {}
        if plain and time.perf_counter() - started < cap:
            try:
                profiled["packforcing"] = profile_block(session.step, sizes)
            except Exception as exc:  # recorded; the measurement stands without it
                profiled["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    unperturbed: dict[str, Any] = {}
    if plain and tokens:
        fixed_block = fixed_context_block(engine, sizes, tokens, position, conditions)
        fixed = fixed_context_block_seconds(fixed_block, sizes, sizes.timed_blocks)
        late = median(plain)
        unperturbed = {
            "block_ms": late * 1e3,
            "fixed_context_block_ms": fixed * 1e3,
            "context_tokens": tokens,
            "cache_management_share": (late - fixed) / late,
        }
        if "packforcing" in profiled:
            try:
                profiled["fixed_context"] = profile_block(fixed_block, sizes)
            except Exception as exc:
                profiled["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    shares = {k: v / total for k, v in parts.items()} if total else {}
    cache = ("compression", "selection", "realignment", "bookkeeping")
    return {
        "host_syncs_per_block": syncs,
        "unperturbed": unperturbed,
        "profile": profiled,
        "warm_blocks": warm,
        "timed_blocks": len(measured),
        "block_ms": 1e3 * total / len(measured) if measured else math.nan,
        "seconds": seconds,
        "share": shares,
        "cache_management_share": sum(shares.get(k, 0.0) for k in cache),
        "realignment_share": shares.get("realignment", math.nan),
    }


def profile_table(profiled: dict) -> str:
    """One block under ``torch.profiler``: PackForcing against the fixed context, and the
    PackForcing block's costliest kernels."""
    if "packforcing" not in profiled:
        return f"\nProfile: {profiled.get('error', 'not run')}\n" if profiled else ""
    rows = [
        [name, p["operators"], p["attention_calls"], p["kernel_launches"], p["kernel_ms"], p["profiled_wall_ms"]]
        for name, p in profiled.items()
        if name != "error"
    ]
    top = profiled["packforcing"]["top_kernels"]
    return (
        "\nOne block under torch.profiler (kernel time exact; wall time inflated by the profiler):\n\n"
        + markdown_table(
            ["block", "operators from Python", "attention calls", "kernel launches", "kernel ms", "profiled wall ms"],
            rows,
        )
        + "\n\nCostliest kernels of the PackForcing block:\n\n"
        + markdown_table(["kernel", "launches", "ms"], [[k["name"], k["count"], k["ms"]] for k in top])
        + (
            "\n\nWhere the PackForcing block's extra kernel time goes (against the fixed-context block):\n\n"
            + markdown_table(["kernel", "extra launches", "extra ms"], kernel_differences(profiled))
            if "fixed_context" in profiled
            else ""
        )
        + (f"\n\nProfile error: {profiled['error']}" if "error" in profiled else "")
    )


def shares_table(data: dict, variant: dict[str, Any] | None = None) -> str:
    s = data["share"]
    changed = ", ".join(f"{section} {params}" for section, params in (variant or {}).items())
    variant = f", {changed}" if changed else ""
    syncs = data.get("host_syncs_per_block")
    u = data.get("unperturbed") or {}
    unperturbed = (
        "\nUnperturbed (no section syncs): PackForcing block vs the same model work over a fixed context of "
        "as many tokens (no cache management):\n\n"
        + markdown_table(
            ["context tokens", "packforcing block ms", "fixed-context block ms", "cache mgmt %"],
            [[u["context_tokens"], u["block_ms"], u["fixed_context_block_ms"], 100 * u["cache_management_share"]]],
        )
        if u
        else ""
    )
    return (
        f"Where a PackForcing block's time goes at a full cache{variant} ({data['timed_blocks']} blocks after "
        f"{data['warm_blocks']}; instrumented: synchronises at every section boundary):\n\n"
        + markdown_table(
            [
                "block ms",
                "forward %",
                "compress %",
                "select %",
                "gather+realign %",
                "bookkeeping %",
                "cache mgmt %",
                "host syncs / block",
                "of them reads",
            ],
            [
                [
                    data["block_ms"],
                    100 * s.get("model_forward", math.nan),
                    100 * s.get("compression", math.nan),
                    100 * s.get("selection", math.nan),
                    100 * s.get("realignment", math.nan),
                    100 * s.get("bookkeeping", math.nan),
                    100 * data["cache_management_share"],
                    syncs["total"] if syncs else "-",
                    sum(syncs["reads"].values()) if syncs else "-",
                ]
            ],
        )
        + unperturbed
        + profile_table(data.get("profile") or {})
    )


def run_shares(registry: Registry, sizes: Sizes, cap: float, conditions, variant: dict[str, dict[str, Any]]) -> dict:
    """:func:`shares_section` on a fresh instrumented PackForcing engine (its config sections'
    parameters updated with ``variant``); an error is recorded, not raised."""
    timer = SectionTimer(sync=sizes.cuda)
    engine = engine_for("packforcing", registry, sizes, wrap=timing_wrapper(timer), variant=variant)
    warm = steady_blocks(engine) + sizes.steady_extra_blocks
    try:
        shares = shares_section(engine, timer, sizes, warm=warm, cap=cap, conditions=conditions)
    except Exception as exc:  # recorded; the remaining sections still run
        shares = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    shares["variant"] = variant
    engine.policy.reset()
    del engine
    free_memory(sizes)
    return shares


def engine_for(
    name: str, registry: Registry, sizes: Sizes, wrap: Any = None, variant: dict[str, dict[str, Any]] | None = None
) -> Any:
    """An engine on the shared model with policy ``name``, the parameters of its config sections
    updated with ``variant`` (``{"selector": {...}, "backend": {...}}``)."""
    dtype = str(sizes.dtype).removeprefix("torch.")
    config = {
        "model": {"name": "wan_benchmark"},
        **policy_blocks(sizes)[name],
        "backend": {"name": "sdpa"},
        "sampler": {"name": "self_forcing"},
        "run": {"device": sizes.device, "dtype": dtype},
    }
    for section, params in (variant or {}).items():
        config[section] = {**config[section], **params}
    return pf.build_engine(config, registry=registry, wrap=wrap)


def steady_blocks(engine: Any) -> int:
    """Blocks until every tier of the policy is full (PackForcing: sink + mid bank + recent)."""
    plan = engine.policy.plan(10_000)
    return sum(t.blocks for t in plan.tiers.values()) + 1


def memory_cap_problem(gib: float, sizes: Sizes) -> str | None:
    """What is wrong with ``--memory-gib``: it must be > 0 and, on a GPU, within the card."""
    if not (math.isfinite(gib) and gib > 0):
        return "expected a number of GiB > 0"
    if sizes.cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        if gib * 2**30 > total:
            return f"more than the card's {total / 2**30:.1f} GiB"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where wan_gpu.json / wan_gpu.md go")
    parser.add_argument("--budget", type=float, default=470.0, help="wall-clock seconds for the whole run")
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with a tiny Wan")
    parser.add_argument(
        "--only",
        type=parse_only,
        default=SECTIONS,
        help=f"comma-separated sections to run (of {','.join(SECTIONS)}); writes wan_gpu_<sections>.*",
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        metavar="G",
        help="cap what the run may allocate at G GiB (79.1 on an H200, as wan_gpu_device.sh sets: where an "
        "80 GB H100 runs out)",
    )
    args = parser.parse_args(argv)
    only: tuple[str, ...] = args.only
    stem = "wan_gpu" if only == SECTIONS else "wan_gpu_" + "_".join(only)
    sizes = SMOKE if args.smoke else GPU
    if sizes.cuda and not torch.cuda.is_available():
        print("benchmarks/wan_gpu.py needs CUDA (--smoke runs it on the CPU with a tiny model)", file=sys.stderr)
        return 1
    if args.memory_gib is not None:
        problem = memory_cap_problem(args.memory_gib, sizes)
        if problem:
            parser.error(f"--memory-gib {args.memory_gib:g}: {problem}")
        sizes = attrs.evolve(sizes, memory_cap_bytes=int(args.memory_gib * 2**30))
        if sizes.cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(sizes.memory_cap_bytes / total, 0)
    budget = Budget(args.budget)
    results = Results(args.out, sizes, stem)
    tf = sizes.transformer
    heads, head_dim = tf["num_attention_heads"], tf["attention_head_dim"]
    started = time.perf_counter()
    model = random_wan(sizes)
    sync(sizes)
    g = model.geometry
    results.data["setup"] = {
        "device": torch.cuda.get_device_name(0) if sizes.cuda else "CPU (smoke run)",
        "total_memory": torch.cuda.get_device_properties(0).total_memory if sizes.cuda else None,
        "dtype": str(sizes.dtype),
        "transformer": tf,
        "latent": sizes.latent,
        "frames_per_block": g.frames_per_block,
        "tokens_per_block": g.tokens_per_block,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.transformer.parameters()),
        "build_seconds": time.perf_counter() - started,
        "budget_seconds": args.budget,
        "memory_cap_bytes": sizes.memory_cap_bytes,
        "sections": list(only),
    }
    registry = Registry.create(entry_points=False, extra_plugins=[(SharedModel(model), "wan-gpu-benchmark")])
    with tempfile.TemporaryDirectory() as tmp:
        conditions = [{"from_block": 0, "embeds": str(prompt_embeds_file(sizes, Path(tmp)))}]

        # 1. attention kernels on the real context shapes
        if "attention" in only:
            pf_engine = engine_for("packforcing", registry, sizes)
            contexts = {
                "_queries": g.tokens_per_block,
                "packforcing": pf_engine.policy.plan(sizes.max_blocks["packforcing"]).context_tokens
                + g.tokens_per_block,
                **sizes.attention_contexts,
            }
            del pf_engine
            attention = attention_section(sizes, contexts, heads, head_dim, budget.cap(sizes.caps["attention"]))
            results.add("attention", attention, attention_table(attention))
        if "copy" in only:
            try:  # the per-layer context copy vs attention over the stored pieces (no copy)
                tpb, fpb = g.tokens_per_block, g.frames_per_block
                policy = policy_blocks(sizes)["packforcing"]["policy"]
                copy = copy_section(
                    sizes,
                    sink=policy["sink_frames"] // fpb,
                    picks=sizes.top_k,
                    recent=policy["recent_frames"] // fpb,
                    tpb=tpb,
                    pool=pf_preset_mid_tokens(sizes, g),
                    heads=heads,
                    head_dim=head_dim,
                )
            except Exception as exc:  # recorded; the rest still runs
                copy = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
            results.add("copy", copy, f"Per-layer context copy: {copy['error']}" if "error" in copy else "")
            add_copy_table(results, g.num_layers)

        # 2. per policy: time and memory against video length (full last: it runs until OOM)
        runs: dict[str, dict] = {}
        for name in (*(p for p in POLICIES if p in only), None):
            if name is not None:
                if budget.left() < 5:
                    runs[name] = {"skipped": "budget spent"}
                    continue
                engine = engine_for(name, registry, sizes)
                runs[name] = run_policy(
                    engine,
                    sizes,
                    cap=budget.cap(sizes.caps[name]),
                    max_blocks=sizes.max_blocks[name],
                    conditions=conditions,
                )
                engine.policy.reset()
                del engine
                free_memory(sizes)
                done = {k: v for k, v in runs.items() if "rows" in v}
                results.add("policies", runs, policy_table(done), memory_table(done, sizes.memory_marks))
                add_copy_table(results, g.num_layers)
            # 3. right after packforcing (or first, without it): the cache-management share at a
            # full PackForcing cache (instrumented engine)
            first = name == "packforcing" or (name is None and "packforcing" not in only)
            for section, variant in SHARES.items():
                if section in only and first and budget.left() > 5:
                    shares = run_shares(registry, sizes, budget.cap(sizes.caps[section]), conditions, variant)
                    table = shares_table(shares, variant) if "error" not in shares else shares["error"]
                    results.add(section, shares, table)
                    add_copy_table(results, g.num_layers)
    results.data["total_seconds"] = time.perf_counter() - started
    results.write()
    print(results.text())
    print(
        f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')} in {results.data['total_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
