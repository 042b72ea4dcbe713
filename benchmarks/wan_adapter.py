"""What the Wan adapter costs and what the cache buys, against diffusers' own forward.

A random ``WanTransformer3DModel`` (mid size by default, so it runs on a CPU) is saved as a
diffusers folder and loaded through model ``wan``. Measured in one run, same machine:

1. one model call on one block with no history: the adapter's ``denoise`` against diffusers'
   ``WanTransformer3DModel.forward`` (the ratio is the adapter's overhead: per-frame modulation,
   RoPE through packforcing, the context's attention);
2. one block after ``k`` cached blocks (4 sampler steps + the clean pass, policy ``full``)
   against recomputing the history without a cache: diffusers' forward over the whole
   ``k + 1``-block sequence with a block-causal mask, 5 calls (what a cache-free sampler pays).

Medians of ``--repeats`` runs. Writes ``benchmarks/results/wan_adapter.{json,md}``.
``--smoke`` runs the same code at toy size (exercised by a test). No speed is asserted anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_out, markdown_table, write_results

import packforcing as pf
from packforcing.attention import SdpaBackend
from packforcing.core.context import EmptyContext
from packforcing.testing import block_causal_mask


def random_transformer(layers: int, heads: int, head_dim: int, text_dim: int, seed: int = 0):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=3 * heads * head_dim,
        num_layers=layers,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MaskedProcessor:
    """diffusers' WanAttnProcessor with a mask on self-attention."""

    def __init__(self, holder: dict) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner, self.holder = WanAttnProcessor(), holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.holder["mask"], rotary_emb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--latent", type=int, nargs=2, default=(16, 26), metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=3, help="latent frames per block")
    parser.add_argument("--history", type=int, nargs="+", default=[1, 4, 8], help="cached blocks before the block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, one repeat, nothing written")
    add_out(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.heads, args.head_dim, args.latent, args.history, args.repeats = 1, 2, 32, (4, 6), [1, 2], 1
    from diffusers import WanTransformer3DModel

    text_dim = 64
    h, w = args.latent
    f = args.frames
    with tempfile.TemporaryDirectory() as tmp:
        random_transformer(args.layers, args.heads, args.head_dim, text_dim).save_pretrained(tmp)
        reference = WanTransformer3DModel.from_pretrained(tmp).eval()
        config = {
            "model": {"name": "wan", "path": tmp, "frames_per_block": f, "latent_height": h, "latent_width": w},
            "policy": "full",
            "backend": "sdpa",
            "sampler": {"name": "self_forcing"},
            "run": {"device": "cpu", "dtype": "float32"},
        }
        engine = pf.build_engine(config)
        model = engine.model
        g = engine.geometry
        embeds = torch.randn(1, 64, text_dim, generator=torch.Generator().manual_seed(1))
        cond = model.condition_from(embeds)
        gen = torch.Generator().manual_seed(2)
        block = torch.randn(1, 16, f, h, w, generator=gen)
        t = torch.full((1,), 750.0)

        rows = []
        with torch.no_grad():
            adapter_call = median_seconds(
                lambda: model.denoise(block, t, EmptyContext(SdpaBackend(), 0.0), cond), args.repeats
            )
            diffusers_call = median_seconds(
                lambda: reference(hidden_states=block, timestep=t, encoder_hidden_states=embeds, return_dict=False),
                args.repeats,
            )
        rows.append(["one call, no history", g.tokens_per_block, adapter_call * 1e3, diffusers_call * 1e3])

        holder: dict = {}
        reference.set_attn_processor(
            {
                name: MaskedProcessor(holder) if ".attn1." in name else type(proc)()
                for name, proc in reference.attn_processors.items()
            }
        )
        schedule = [{"from_block": 0}]
        cache_rows = []
        for k in args.history:
            # the cached engine: time of block k (after k blocks), 4 sampler steps + clean pass
            def cached_block(k=k):
                with engine.session(seed=0, conditions=schedule) as session:
                    for _ in range(k):
                        session.step()
                    start = time.perf_counter()
                    session.step()
                    return time.perf_counter() - start

            cached = statistics.median(cached_block() for _ in range(args.repeats))
            seq = torch.randn(1, 16, (k + 1) * f, h, w, generator=gen)
            holder["mask"] = block_causal_mask(k + 1, g.tokens_per_block, range)
            steps = torch.zeros(1, (k + 1) * f * g.tokens_per_frame)

            def recompute(seq=seq, steps=steps):
                for _ in range(5):
                    reference(hidden_states=seq, timestep=steps, encoder_hidden_states=embeds, return_dict=False)

            with torch.no_grad():
                uncached = median_seconds(recompute, args.repeats)
            cache_rows.append([k, (k + 1) * g.tokens_per_block, cached * 1e3, uncached * 1e3, uncached / cached])

    table = (
        f"Random Wan transformer: {args.layers} layers, {args.heads} heads x {args.head_dim}, "
        f"latent {h}x{w}, {f}-frame blocks ({g.tokens_per_block} tokens), float32, CPU threads "
        f"{torch.get_num_threads()}; medians of {args.repeats}.\n\n"
        + markdown_table(["call", "tokens", "adapter ms", "diffusers forward ms"], rows)
        + f"\nadapter / diffusers (one call): {adapter_call / diffusers_call:.3f}\n\n"
        + "One block (4 sampler steps + clean pass) after k cached blocks, policy full, vs diffusers' "
        "forward over the whole sequence (5 calls, block-causal mask, no cache):\n\n"
        + markdown_table(
            ["k", "sequence tokens", "cached block ms", "uncached block ms", "uncached / cached"], cache_rows
        )
    )
    data = {
        "config": vars(args) | {"latent": list(args.latent)},
        "one_call": {"adapter_s": adapter_call, "diffusers_s": diffusers_call, "ratio": adapter_call / diffusers_call},
        "per_block": [
            {"history_blocks": r[0], "tokens": r[1], "cached_ms": r[2], "uncached_ms": r[3], "ratio": r[4]}
            for r in cache_rows
        ],
    }
    if args.smoke:
        print(table)
    else:
        write_results("wan_adapter", data, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
