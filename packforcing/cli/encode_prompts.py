"""``packforcing encode-prompts``: precompute Wan prompt embeddings once, then free the encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from packforcing.cli import add_verb
from packforcing.cli.argtypes import non_empty_text

EXAMPLE = """example:
  packforcing encode-prompts --text-encoder ~/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.yaml --out embeds/
  packforcing generate --config wan2.1-1.3b/packforcing --set model.path=CKPT \\
      --prompts embeds/prompts.yaml --seconds 120 --out out/fox

prompts.yaml is a list of segments, each {from_block: N | from_second: S, prompt: TEXT}, the first
starting at 0. DIR receives one prompt_NNN.safetensors per distinct text (prompt_embeds [L, D], the
text in the metadata) and DIR/prompts.yaml: the same schedule with embeds: FILE in place of each
prompt, which generate reads without loading the text encoder.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub,
        "encode-prompts",
        help="encode text prompts with Wan's UMT5 encoder into safetensors embeddings",
        description="Encode the prompts of a prompt file (or one --prompt) with the UMT5 text encoder at "
        "PATH (a diffusers pipeline root with text_encoder/ and tokenizer/, or the encoder folder) and "
        "write prompt_embeds safetensors files plus a prompts.yaml schedule that points at them, so "
        "generation never holds the encoder.",
        example=EXAMPLE,
    )
    p.add_argument("--text-encoder", required=True, metavar="PATH", help="pipeline root or UMT5 encoder folder")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: found beside it)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE", help="YAML/JSON list of {from_block | from_second, prompt}")
    source.add_argument("--prompt", type=non_empty_text, metavar="TEXT", help="one prompt for the whole video")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) or a dtype name")
    p.add_argument("--max-length", type=int, default=512, help="tokens per prompt (Wan: 512)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from packforcing.models.wan.text import TextEncoderParams, encode_schedule, read_prompt_file

    try:
        params = TextEncoderParams(
            path=args.text_encoder,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            max_length=args.max_length,
        )
    except ValueError as exc:
        raise ValueError("--" + str(exc).replace("max_length", "max-length", 1)) from None
    params.check_device("--device")
    if args.prompts:
        segments = read_prompt_file(args.prompts)
    else:  # --prompt, non-empty: its argparse type
        segments = [{"from_block": 0, "prompt": args.prompt}]
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before the encoder loads
        raise ValueError(f"--out: {out} is a file, not a folder")
    encoded = encode_schedule(segments, params, out)
    lines = []
    for original, seg in zip(segments, encoded, strict=True):
        if "prompt" in original:
            seg = {**seg, "embeds": Path(seg["embeds"]).name}
            lines.append(f"# {' '.join(original['prompt'].split())}")
        lines.append(yaml.safe_dump([seg], sort_keys=False).rstrip())
    schedule = out / "prompts.yaml"
    out.mkdir(parents=True, exist_ok=True)
    schedule.write_text("\n".join(lines) + "\n")
    files = sorted({Path(seg["embeds"]).name for seg, o in zip(encoded, segments, strict=True) if "prompt" in o})
    print(f"wrote {len(files)} embedding file(s) and {schedule} ({len(encoded)} segment(s)) to {out}")
    return 0
