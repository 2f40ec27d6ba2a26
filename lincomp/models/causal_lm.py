"""A small causal teacher for the Lizard-style experiments: a tiny ``LlamaForCausalLM`` over bytes.

The model reads UTF-8 bytes (vocabulary 256, no tokenizer to ship) and is trained on the Python
standard library's source (``lincomp.models.corpus.source_bytes``). Everything is deterministic for a
seed: the initial weights, the training windows of each step (drawn from (seed, step)) and the
evaluation windows (evenly spaced, fixed).

    cfg = TeacherConfig(steps=1000)
    model, info = train_teacher(cfg, out_dir="out/teacher")   # resumable; cached once finished
    ppl = perplexity(model, eval_windows(heldout_tokens(), 512, 64))
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from lincomp._atomic import atomic_write_text

VOCAB = 256
# The corpora a teacher can learn (lincomp.models.corpus): the stdlib source as it is, or with every file's own
# identifiers renamed to fresh random names (corpus.scramble_identifiers), where predicting a name needs the
# place, often far back, where the file introduced it.
DATA_KINDS = ("source", "scrambled")


@dataclass(frozen=True)
class LlamaTeacherConfig:
    """A small softmax ``LlamaForCausalLM`` teacher: its architecture and AdamW recipe (the shared base of
    :class:`TeacherConfig` and ``recall.RecallTeacherConfig``, which add their data and vocabulary)."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 2048
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    data: str = "source"    # "source": the stdlib source; "scrambled": its identifiers renamed per file

    def __post_init__(self):
        if self.data not in DATA_KINDS:
            raise ValueError(f"TeacherConfig.data must be one of {list(DATA_KINDS)}, got {self.data!r}")

    def _llama_kwargs(self) -> dict:
        """What the subclass's LlamaConfig adds: ``vocab_size``, ``tie_word_embeddings``, ``rope_theta``..."""
        raise NotImplementedError

    def matches_saved(self, saved: dict) -> bool:
        """Whether a teacher saved with config ``saved`` (``teacher_info.json``) was trained as this one. Fields
        added since it was saved take their defaults, which reproduce what it was trained as (``data`` came after
        the first teachers), so it is loaded, not retrained."""
        as_json = lambda c: json.loads(json.dumps(asdict(c)))   # noqa: E731  (tuples as the file's lists)
        return {**as_json(type(self)()), **saved} == as_json(self)

    def llama_config(self):
        """The matching ``transformers.LlamaConfig`` (RoPE, RMSNorm, SwiGLU; no bos / eos / pad ids)."""
        from transformers import LlamaConfig

        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of heads {self.heads}")
        return LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=self.max_positions,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
                           **self._llama_kwargs())


@dataclass(frozen=True)
class TeacherConfig(LlamaTeacherConfig):
    """The byte-level teacher (tied embeddings, 256 byte tokens) and its training windows."""

    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1000

    def _llama_kwargs(self) -> dict:
        return {"vocab_size": VOCAB, "tie_word_embeddings": True}


def tiny_llama(cfg: TeacherConfig = TeacherConfig()):
    """A freshly initialised ``LlamaForCausalLM`` for ``cfg`` (weights fixed by ``cfg.seed``)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(cfg.llama_config()).eval()


# ------------------------------------------------------------------------------------------- data
def encode(text: Union[str, bytes]) -> torch.Tensor:
    """Bytes (or a string as UTF-8) -> a LongTensor of token ids 0..255."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(ids) -> str:
    """Token ids -> text (invalid UTF-8 is replaced)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def corpus_tokens(split: str = "train", max_bytes: Optional[int] = None, data: str = "source") -> torch.Tensor:
    """The stdlib source of ``split`` ("train" / "heldout") as byte ids (``data``: one of ``DATA_KINDS``)."""
    tokens = torch.cat(corpus_documents(split, data=data)) if data != "source" else None
    if tokens is None:
        from lincomp.models.corpus import source_bytes

        return encode(source_bytes(split, max_bytes=max_bytes))
    return tokens if max_bytes is None else tokens[:max_bytes]


def corpus_documents(split: str = "train", max_bytes: Optional[int] = None, data: str = "source") -> List[torch.Tensor]:
    """The stdlib source files of ``split``, each a LongTensor of byte ids (one document per file); ``data``
    "scrambled": each file's identifiers renamed (the renaming is fixed: seed 0, whatever the run's seed)."""
    from lincomp.models.corpus import scrambled_documents, source_documents

    if data not in DATA_KINDS:
        raise ValueError(f"data must be one of {list(DATA_KINDS)}, got {data!r}")
    docs = (source_documents(split, max_bytes=max_bytes) if data == "source"
            else scrambled_documents(split, seed=0, max_bytes=max_bytes))
    return [encode(d) for d in docs]


def packed_batches(documents: Sequence[torch.Tensor], seq_len: int, batch_size: int,
                   seed: int = 0) -> Callable[[int], dict]:
    """``step -> batch``: packed rows (Lizard's and LoLCATs' training data), a pure function of (seed, step).

    Every document is cut into pieces of at most ``seq_len`` tokens (the positions the teacher was trained on);
    the pieces, shuffled once by ``seed``, are packed greedily into rows of at most ``batch_size * seq_len``
    tokens (the tokens of a ``[batch_size, seq_len]`` window batch) with no padding. A batch is one row as
    :func:`lincomp.models.packing.packed_row` makes it: ``position_ids`` restart at every piece (linearised
    layers attend each piece on its own, through ``cu_seqlens``) and no piece predicts another's tokens."""
    from lincomp.models.packing import pack_lengths, packed_row

    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    pieces = [(d, a, min(a + seq_len, doc.numel())) for d, doc in enumerate(documents)
              for a in range(0, doc.numel(), seq_len)]
    if not pieces:
        raise ValueError("packed_batches got no tokens (every document is empty)")
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    pieces = [pieces[i] for i in order]
    rows = pack_lengths([b - a for _, a, b in pieces], batch_size * seq_len)

    def at(step: int) -> dict:
        return packed_row([documents[d][a:b] for d, a, b in (pieces[i] for i in rows[step % len(rows)])])

    at.digest = f"packed_batches(seq_len={seq_len}, batch_size={batch_size}, seed={seed}, rows={len(rows)})"
    return at


def window_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """``step -> [batch_size, seq_len]`` random windows of ``tokens``, a pure function of (seed, step)."""
    n = tokens.numel() - seq_len
    if n <= 0:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than seq_len {seq_len}")

    def at(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, n, (batch_size,), generator=g)
        return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])

    return at


def eval_windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``[count, seq_len]`` non-overlapping windows spread evenly over ``tokens`` (fixed, no randomness)."""
    n = tokens.numel() // seq_len
    if n < 1:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than seq_len {seq_len}")
    count = min(count, n)
    idx = torch.linspace(0, n - 1, count).round().long().tolist()
    return torch.stack([tokens[i * seq_len:(i + 1) * seq_len] for i in idx])


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Per-position mean next-token NLL ``[seq_len - 1]`` over ``windows`` (nats)."""
    dev = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size].to(dev)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += nll.double().sum(0).cpu()
    return total / windows.shape[0]


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, start: int = 0) -> float:
    """exp(mean next-token NLL) over ``windows``, counting predicted positions ``>= start`` only."""
    nll = token_nll(model, windows, batch_size)
    return float(math.exp(nll[start:].mean().item()))


@torch.no_grad()
def copy_probe(model, tokens: torch.Tensor, length: int = 1024, span: int = 128, count: int = 4,
               seed: int = 7) -> dict:
    """Does a causal byte model copy from far back (what induction heads do)? ``count`` windows of ``length``
    bytes of ``tokens`` (fixed, :func:`eval_windows`), each with one random lowercase string of ``span`` bytes
    written at byte 16 and again at the end. Returns the mean next-byte NLL (nats) over the string's first
    occurrence (unpredictable: ~ln 26 = 3.26 for a model that knows it is letters) and over its second (~0 for
    a model that copies; the same as the first for one that does not), and the distance between them (bytes)."""
    if span < 2 or 16 + 2 * span > length:
        raise ValueError(f"copy_probe needs 2 <= span and 16 + 2 * span <= length, got span {span}, length {length}")
    x = eval_windows(tokens, length, count).clone()
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(ord("a"), ord("z") + 1, (x.shape[0], span), generator=g)
    x[:, 16:16 + span] = s
    x[:, length - span:] = s
    nll = token_nll(model, x, batch_size=2)           # nll[i] predicts byte i + 1
    first = nll[16:16 + span - 1].mean().item()        # bytes 17 .. 16 + span - 1 (the first byte is a guess)
    second = nll[length - span:].mean().item()         # bytes length - span + 1 .. length - 1
    return {"first": first, "second": second, "distance": length - span - 16, "span": span}


# ------------------------------------------------------------------------------------------ train
def _save_dir_atomically(model, out_dir: Path, info: dict) -> None:
    """save_pretrained into a temp folder, then swap it in (readers never see half a model)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    atomic_write_text(tmp / "teacher_info.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)


def load_teacher(out_dir: Union[str, Path], cfg: Optional[LlamaTeacherConfig] = None):
    """A finished teacher from ``out_dir`` (and its info), or None when absent or trained with another cfg (any
    :class:`LlamaTeacherConfig`: the recall teacher's too)."""
    out_dir = Path(out_dir)
    info_path = out_dir / "teacher_info.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    if cfg is not None and not cfg.matches_saved(info.get("config", {})):
        return None
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(out_dir).eval(), info


def train_teacher(cfg: TeacherConfig = TeacherConfig(), out_dir: Optional[Union[str, Path]] = None, *,
                  tokens: Optional[torch.Tensor] = None, device: Optional[Union[str, torch.device]] = None,
                  progress: bool = True) -> Tuple[object, dict]:
    """Train the byte-level teacher on ``tokens`` (default: the stdlib source, train split).

    With ``out_dir`` a finished teacher there is loaded instead of retrained, and an interrupted run
    resumes from ``out_dir``'s checkpoint. Returns ``(model, info)``.
    """
    from lincomp.models.distill import train_steps

    if out_dir is not None:
        found = load_teacher(out_dir, cfg)
        if found is not None:
            return found
    tokens = corpus_tokens("train", data=cfg.data) if tokens is None else tokens
    model = tiny_llama(cfg)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model.to(dev)
    batches = window_batches(tokens, cfg.seq_len, cfg.batch_size, cfg.seed)
    params = dict(sorted(model.named_parameters()))

    def loss_at(step: int):
        x = batches(step).to(dev)
        loss = model(input_ids=x, labels=x).loss
        return loss, {"bits_per_byte": loss.item() / math.log(2)}

    ckpt = None
    if out_dir is not None:
        ckpt = Path(out_dir).with_name(f"{Path(out_dir).name}.train.safetensors")
    t0 = time.perf_counter()
    history, resumed = train_steps(params, loss_at, steps=cfg.steps, lr=cfg.lr, name="teacher", seed=cfg.seed,
                                   weight_decay=cfg.weight_decay, checkpoint=ckpt, checkpoint_every=100,
                                   settings={"config": asdict(cfg), "tokens": int(tokens.numel())},
                                   progress=progress, log_every=10)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    info = {"config": asdict(cfg), "wall_s": time.perf_counter() - t0, "resumed_from": resumed,
            "train_tokens": int(tokens.numel()), "final_loss": history[-1]["loss"] if history else None,
            "history": history[-20:]}
    if out_dir is not None:
        _save_dir_atomically(model, Path(out_dir), info)
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
    return model, info


# The teacher whose predictions need far context (``lincomp distill causal-lm --teacher scrambled``): the same
# 4 x 128 Llama, trained on 1024-byte windows of the identifier-scrambled source (4 per step, 300 steps: about
# 20 min at 1 thread on a quiet 2-core CPU, 35 on a busy one), RoPE positions up to 8192 for the 4x evaluation.
TEACHERS = {"source": TeacherConfig(),
            "scrambled": TeacherConfig(data="scrambled", seq_len=1024, batch_size=4, steps=300, max_positions=8192)}
