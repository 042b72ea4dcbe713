"""Text prompts for Wan: the UMT5 encoder, prompt files, and precomputed embeddings.

Wan2.1 conditions on UMT5-XXL hidden states: the prompt is tokenised to 512 tokens
(padded, truncated, with the end token), encoded, and the states past the prompt's own
tokens are zeroed — ``prompt_embeds [512, 4096]``. :class:`TextEncoder` does exactly that
with transformers' ``UMT5EncoderModel`` and the tokenizer saved beside it, loaded from a
local path (a diffusers pipeline root with ``text_encoder/`` and ``tokenizer/``, or the
encoder folder itself); it is meant to be used as a context manager, so the encoder is
freed before the transformer is loaded.

Embeddings are stored as safetensors files holding one tensor ``prompt_embeds [L, D]`` (the
file's metadata records the prompt text), the format the Wan model reads with
``encode_condition({"embeds": FILE})``.

A prompt file (YAML or JSON) is a list of segments ``{from_block: N | from_second: S,
prompt: TEXT | embeds: FILE}``; the first starts at block / second 0 and starts increase.
``embeds`` paths are relative to the prompt file.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from packforcing.core.config import TextEncoderParams
from packforcing.core.freeing import freed_on_error, return_memory
from packforcing.core.weightfiles import cast_damage, weights_files
from packforcing.output.video import latent_frame_of

EMBEDS_KEY = "prompt_embeds"
FORMAT = "packforcing.prompt_embeds/1"
MAX_LENGTH = 512
"""Wan's text length in tokens."""
__all__ = ["TextEncoder", "TextEncoderParams"]
START_KEYS = ("from_block", "from_second")
SPEC_KEYS = ("prompt", "embeds")
ENCODER_WEIGHTS = "model.safetensors"
"""transformers' weights file (or, sharded, its ``.index.json``)."""
ENCODER_TORCH_WEIGHTS = "pytorch_model.bin"
"""What transformers reads without :data:`ENCODER_WEIGHTS` (or, sharded, its ``.index.json``)."""
UNUSED_PREFIXES = ("decoder.", "lm_head.")
"""Weights of a whole UMT5 (encoder-decoder) checkpoint that the encoder does not use."""


def locate(path: str | Path, tokenizer: str | Path | None = None) -> tuple[Path, Path]:
    """``(encoder folder, tokenizer folder)`` for a pipeline root or an encoder folder."""
    root = Path(path).expanduser()
    if (root / "text_encoder" / "config.json").is_file():
        encoder = root / "text_encoder"
        default_tokenizer = root / "tokenizer"
    elif (root / "config.json").is_file():
        encoder = root
        beside = root.parent / "tokenizer"
        default_tokenizer = root if _has_tokenizer(root) or not _has_tokenizer(beside) else beside
    else:
        raise ValueError(f"{path}: not a text encoder folder (no config.json here or in text_encoder/)")
    tok = Path(tokenizer).expanduser() if tokenizer is not None else default_tokenizer
    if not _has_tokenizer(tok):
        raise ValueError(f"{tok}: no tokenizer here (give text_encoder.tokenizer: the tokenizer folder)")
    return encoder, tok


def _check_umt5_config(file: Path) -> None:
    """Refuse a config that is not a UMT5 model's (transformers would build a UMT5 from it anyway)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: unreadable config: {' '.join(str(exc).split())}") from None
    kind = data.get("model_type") if isinstance(data, Mapping) else None
    if kind != "umt5":
        raise ValueError(f"{file}: a {kind or 'non-transformers'} model, not UMT5 (Wan's text encoder)")


def _few(names: Sequence[str]) -> str:
    return f"({len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _refusal(model: Any, info: Mapping[str, list[str]], tok: Any, encoder_dir: Path, tokenizer_dir: Path) -> str | None:
    """Why the loaded UMT5 ``model`` (with transformers' loading ``info``) and tokenizer ``tok``
    are not a usable encoder, in one line; ``None`` when they are."""
    # transformers only logs these: a missing weight would be left at its random initial value
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(UNUSED_PREFIXES))
    if missing or unexpected:
        problem = f"missing weights {_few(missing)}" if missing else f"unexpected weights {_few(unexpected)}"
        return f"{encoder_dir}: not the UMT5 encoder its config.json describes: {problem}"
    if len(tok) > model.config.vocab_size:
        return (
            f"{tokenizer_dir}: the tokenizer has {len(tok)} tokens, the text encoder's vocabulary "
            f"{model.config.vocab_size}: not this encoder's tokenizer"
        )
    return None


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
    return folder.is_dir() and any((folder / name).is_file() for name in names)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: HTML entities unescaped, whitespace runs collapsed, ends stripped
    (diffusers additionally applies ``ftfy.fix_text`` when ftfy is installed)."""
    return " ".join(html.unescape(html.unescape(text)).split())


class TextEncoder:
    """UMT5 encoder + tokenizer: prompts → ``prompt_embeds [max_length, D]`` as Wan computes them.

    Use as a context manager (or call :meth:`close`): the model is released on exit.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = MAX_LENGTH) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_params(cls, params: TextEncoderParams) -> TextEncoder:
        if params.path is None:
            raise ValueError("text_encoder.path: text prompts need a text encoder (a pipeline root or its folder)")
        params.check_device()
        return cls.from_path(
            params.path,
            tokenizer=params.tokenizer,
            device=params.torch_device(),
            dtype=params.torch_dtype(),
            max_length=params.max_length,
        )

    @classmethod
    @freed_on_error
    def from_path(
        cls,
        path: str | Path,
        *,
        tokenizer: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = MAX_LENGTH,
    ) -> TextEncoder:
        from transformers import AutoTokenizer, UMT5EncoderModel

        from packforcing.models.wan.imports import loading_quietly

        encoder_dir, tokenizer_dir = locate(path, tokenizer)
        _check_umt5_config(encoder_dir / "config.json")
        try:
            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            # no progress bar or load report of transformers' on stderr: refusals are one line
            with loading_quietly("transformers"):
                # transformers types from_pretrained as returning the model; with output_loading_info: (model, info)
                loaded: tuple[UMT5EncoderModel, dict[str, list[str]]] = UMT5EncoderModel.from_pretrained(  # type: ignore[assignment]
                    str(encoder_dir), torch_dtype=dtype, output_loading_info=True
                )
            model, info = loaded
        except Exception as exc:  # transformers', tokenizers' and safetensors' own error types
            reason = " ".join(str(exc).split())
            raise ValueError(f"{encoder_dir}: cannot load the UMT5 text encoder: {reason}") from None
        problem = _refusal(model, info, tok, encoder_dir, tokenizer_dir)
        if problem is None:
            # in place. transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to),
            # which typeshed types as a plain function: the bound call looks like `self` is missing
            model.to(device)  # type: ignore[arg-type]
            # a weight beyond dtype's range (float32 or bfloat16 weights run in float16)
            files = weights_files(encoder_dir, ENCODER_WEIGHTS, ENCODER_TORCH_WEIGHTS)
            problem = cast_damage(model.state_dict(), files, unused=info["unexpected_keys"])
        if problem is not None:  # the model is freed before the error reaches the caller (freed_on_error)
            raise ValueError(problem)
        return cls(model.requires_grad_(False).eval(), tok, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One ``[max_length, D]`` tensor per prompt: the encoder's last hidden states, zero past
        the prompt's tokens (its end token included), in the encoder's dtype, on the CPU."""
        if self.model is None:
            raise RuntimeError("the text encoder was closed")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask[..., None].to(hidden.dtype)  # Wan zeroes the padding positions
        return [h.cpu().contiguous() for h in hidden]

    def close(self) -> None:
        """Release the model (and its GPU memory)."""
        on_cuda = self.model is not None and self.device.type == "cuda"
        self.model = None
        return_memory(on_cuda)

    def __enter__(self) -> TextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_prompt_embeds(path: str | Path, embeds: torch.Tensor, prompt: str | None = None) -> Path:
    """Write ``prompt_embeds [L, D]`` to a safetensors file (the prompt text in its metadata)."""
    from safetensors.torch import save_file

    if embeds.dim() != 2:
        raise ValueError(f"prompt_embeds must be [L, D], got {tuple(embeds.shape)}")
    path = Path(path)
    meta = {"format": FORMAT}
    if prompt is not None:
        meta["prompt"] = prompt
    save_file({EMBEDS_KEY: embeds.contiguous()}, str(path), metadata=meta)
    return path


def load_prompt_embeds(path: str | Path) -> tuple[torch.Tensor, str | None]:
    """``(prompt_embeds [L, D], prompt text or None)`` from a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if EMBEDS_KEY not in handle.keys():
                raise ValueError(f"{path}: no '{EMBEDS_KEY}' tensor (found: {', '.join(handle.keys()) or 'none'})")
            return handle.get_tensor(EMBEDS_KEY), (handle.metadata() or {}).get("prompt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a safetensors file: {' '.join(str(exc).split())}") from None


# ---- prompt schedules --------------------------------------------------------------------


def _check_segments(segments: Any, where: str, *, conditions: bool = False) -> list[dict[str, Any]]:
    """Validate a prompt schedule (``where`` names its file for the one-line errors). With
    ``conditions``, a segment may give the model's own condition keys (tiny_dit's ``scene``)
    instead of ``prompt`` / ``embeds``; the model checks them (``encode_condition``)."""
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"{where}: expected a non-empty list of {{from_block | from_second, prompt | embeds}}")
    out: list[dict[str, Any]] = []
    for i, seg in enumerate(segments):
        at = f"{where}: [{i}]"
        if not isinstance(seg, Mapping):
            raise ValueError(f"{at}: expected a mapping, got {seg!r}")
        unknown = sorted(set(seg) - {*START_KEYS, *SPEC_KEYS})
        if "recache" in unknown:
            raise ValueError(f"{at}.recache: re-caching is set for every switch by run.recache, not per segment")
        if unknown and not conditions:
            raise ValueError(f"{at}.{unknown[0]}: unknown key (expected from_block | from_second, prompt | embeds)")
        starts = [k for k in START_KEYS if k in seg]
        specs = [k for k in SPEC_KEYS if k in seg]
        if len(starts) != 1:
            raise ValueError(f"{at}: give exactly one of from_block, from_second")
        if conditions and unknown and specs:
            raise ValueError(f"{at}: give prompt or embeds alone, or the model's condition keys (such as scene: N)")
        if conditions and not unknown and not specs:
            raise ValueError(
                f"{at}: give the segment's condition: prompt: TEXT, embeds: FILE or the model's condition keys "
                "(such as scene: N)"
            )
        if len(specs) > 1 or (not specs and not conditions):
            raise ValueError(f"{at}: give exactly one of prompt, embeds")
        key, start = starts[0], seg[starts[0]]
        integral = key == "from_block"
        if isinstance(start, bool) or not isinstance(start, int if integral else (int, float)) or start < 0:
            kind = "an integer" if integral else "a number"
            raise ValueError(f"{at}.{key}: expected {kind} >= 0, got {start!r}")
        if not math.isfinite(start):
            raise ValueError(f"{at}.{key}: expected a finite number, got {start!r}")
        if i == 0 and start != 0:
            raise ValueError(f"{at}.{key}: the first segment must start at 0, got {start!r}")
        value = seg[specs[0]] if specs else ""
        if specs and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{at}.{specs[0]}: expected a non-empty string, got {value!r}")
        out.append(dict(seg))
    return out


def read_prompt_file(path: str | Path, *, conditions: bool = False) -> list[dict[str, Any]]:
    """Segments of a YAML / JSON prompt file; ``embeds`` paths made absolute (relative to it).
    ``conditions``: segments may hold the model's own condition keys (see :func:`_check_segments`)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the prompt file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (the prompt file must be UTF-8 YAML or JSON)") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{path}: not valid {kind}: {' '.join(str(exc).split())}") from None
    segments = _check_segments(data, str(path), conditions=conditions)
    for i, seg in enumerate(segments):
        if "embeds" in seg:
            file = Path(seg["embeds"]).expanduser()
            file = file if file.is_absolute() else (path.parent / file).resolve()
            if not file.is_file():
                raise ValueError(f"{path}: [{i}].embeds: file not found: {file}")
            seg["embeds"] = str(file)
    return segments


def to_block_schedule(
    segments: Iterable[Mapping[str, Any]],
    *,
    fps: float,
    frames_per_block: int,
    temporal_stride: int,
    where: str = "prompts",
) -> list[dict[str, Any]]:
    """Segments with ``from_second`` turned into ``from_block`` (the block holding that moment);
    starts must stay strictly increasing after the conversion."""
    out: list[dict[str, Any]] = []
    for i, seg in enumerate(segments):
        seg = dict(seg)
        if "from_second" in seg:
            second = seg.pop("from_second")
            seg = {"from_block": latent_frame_of(second, fps, temporal_stride) // frames_per_block, **seg}
            if out and seg["from_block"] <= out[-1]["from_block"]:
                raise ValueError(
                    f"{where}: [{i}].from_second: {second} s falls in block {seg['from_block']}, "
                    f"which the previous segment already starts (blocks are {frames_per_block} latent frames)"
                )
        elif out and seg["from_block"] <= out[-1]["from_block"]:
            raise ValueError(f"{where}: [{i}].from_block: starts must increase, got {seg['from_block']}")
        out.append(seg)
    return out


def encode_schedule(
    segments: Sequence[Mapping[str, Any]], params: TextEncoderParams, out_dir: str | Path
) -> list[dict[str, Any]]:
    """Replace every ``prompt: TEXT`` segment by ``embeds: FILE`` (one file per distinct text in
    ``out_dir``, encoded in one batch with the encoder freed afterwards). Segments that already
    hold ``embeds`` are kept; no encoder is loaded when there is no text."""
    texts = list(dict.fromkeys(seg["prompt"] for seg in segments if "prompt" in seg))
    files: dict[str, str] = {}
    if texts:
        with TextEncoder.from_params(params) as encoder:
            embeds = encoder.encode(texts)
        out = Path(out_dir).expanduser().resolve()  # the run's prompts name them from any directory
        out.mkdir(parents=True, exist_ok=True)
        for i, (text, tensor) in enumerate(zip(texts, embeds, strict=True)):
            files[text] = str(save_prompt_embeds(out / f"prompt_{i:03d}.safetensors", tensor, text))
    result = []
    for seg in segments:
        seg = dict(seg)
        if "prompt" in seg:
            seg["embeds"] = files[seg.pop("prompt")]
        result.append(seg)
    return result
