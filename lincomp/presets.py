"""Ready-made specs for the papers' configurations (SEEDS.md)."""

from __future__ import annotations

from lincomp.spec import AttentionSpec, GridWindow, LinearBranch, TerracedWindow, Window1D


def clear(radius: int = 8, grid=(64, 64), text_tokens: int = 512, shape: str = "circle") -> AttentionSpec:
    """CLEAR (arXiv 2412.16112): circular 2D window on the latent grid, text tokens global.

    ``grid`` is the latent token grid (FLUX: image side / 16 per axis, e.g. 1024px -> 64x64).
    """
    return AttentionSpec(window=GridWindow(tuple(grid), radius, shape), prefix=text_tokens,
                         name=f"clear-r{radius}")


def clear_pool(radius: int = 8, factor=4, grid=(64, 64), text_tokens: int = 512,
               shape: str = "circle") -> AttentionSpec:
    """CLEAR's down-sampled variant: the circular window plus every image key/value pooled by ``factor``
    per axis (``window.pool``; the released r=8 / r=16 checkpoints use 4), with a learned ``pool_weight``."""
    f = factor if isinstance(factor, int) else "x".join(map(str, factor))
    return AttentionSpec(window=GridWindow(tuple(grid), radius, shape, pool=factor), prefix=text_tokens,
                         name=f"clear-r{radius}-df{f}")


def lizard(window: int = 128, sinks: int = 4, feature_dim: int = 64, chunk_size: int = 64,
           gate: str = "scalar") -> AttentionSpec:
    """Lizard (arXiv 2507.09025): gated linear attention (exp Hedgehog map, scalar gate, normalised)
    + a causal sliding window of ``window`` keys with ``sinks`` meta-memory logits, summed."""
    return AttentionSpec(window=Window1D(window - 1, 0), causal=True, sinks=sinks,
                         linear=LinearBranch("hedgehog_exp", feature_dim, gate, True, chunk_size),
                         combine="sum", name=f"lizard-w{window}-m{sinks}")


def lolcats(block: int = 64, feature_dim: int = 64, terraced: bool = True, chunk_size: int = 64) -> AttentionSpec:
    """LoLCATs: softmax over a 64-token window (terraced blocks or sliding) + Hedgehog linear attention
    over everything earlier, one shared normaliser."""
    window = TerracedWindow(block) if terraced else Window1D(block - 1, 0)
    return AttentionSpec(window=window, causal=True,
                         linear=LinearBranch("hedgehog", feature_dim, None, True, chunk_size),
                         combine="shared", name=f"lolcats-{'tk' if terraced else 'sw'}{block}")


def gla(gate: str = "vector", chunk_size: int = 64, normalize: bool = False) -> AttentionSpec:
    """GLA: causal gated linear attention with the identity feature map."""
    return AttentionSpec(causal=True, linear=LinearBranch("identity", None, gate, normalize, chunk_size),
                         name=f"gla-{gate}")


def sliding_window(window: int = 128, sinks: int = 0) -> AttentionSpec:
    """Causal sliding-window softmax of ``window`` keys (query i sees i-window+1 .. i)."""
    return AttentionSpec(window=Window1D(window - 1, 0), causal=True, sinks=sinks, name=f"swa-{window}")


def sta(grid=(8, 16, 16), tile=(2, 4, 4), kernel=(3, 3, 3), text_tokens: int = 0) -> AttentionSpec:
    """Sliding Tile Attention (STA, arXiv 2502.04507) on a video latent grid (frames, rows, cols): each
    query sees the ``kernel`` tiles around its own tile (shifted inside at borders); every tile pair is
    all-visible or all-hidden, so a block plan aligned to the tiles has no partly visible block."""
    return AttentionSpec(window=GridWindow(tuple(grid), shape="tile", tile=tuple(tile), kernel=tuple(kernel)),
                         prefix=text_tokens, name="sta-" + "x".join(map(str, grid)))


def natten(grid=(32, 32), kernel: int = 7) -> AttentionSpec:
    """NATTEN neighbourhood attention (arXiv 2204.07143): a ``kernel`` x ``kernel`` token neighbourhood
    that shifts inside at borders (sliding tiles of one token)."""
    nd = len(grid)
    return AttentionSpec(window=GridWindow(tuple(grid), shape="tile", tile=(1,) * nd, kernel=(kernel,) * nd),
                         name=f"natten-k{kernel}")


PAPER_SPECS = {
    "clear-r8": lambda: clear(8),
    "clear-r16": lambda: clear(16),
    "clear-r32": lambda: clear(32),
    "clear-r8-df4": lambda: clear_pool(8, 4),
    "clear-r16-df4": lambda: clear_pool(16, 4),
    "lizard": lizard,
    "lolcats": lolcats,
    "gla-vector": lambda: gla("vector"),
    "gla-scalar": lambda: gla("scalar"),
    "swa-128": lambda: sliding_window(128),
    "sta-video": sta,
    "natten-7": natten,
}


def resolve(text) -> AttentionSpec:
    """A spec from a preset name (see ``PAPER_SPECS``), a JSON file path, a JSON string or a dict."""
    if isinstance(text, str) and text in PAPER_SPECS:
        return PAPER_SPECS[text]()
    try:
        return AttentionSpec.coerce(text)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{text!r} is neither a preset ({', '.join(PAPER_SPECS)}) nor a spec JSON file: {e}") from None
