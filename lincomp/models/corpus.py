"""Offline text corpora that exist on every machine: the running Python's standard library (and, as extra
training text, the docstrings of installed packages).

Two views of the same files, built deterministically (sorted paths, no randomness):

- ``docstring_passages(split)``: English prose, the module / class / function docstrings of the
  stdlib, joined per file into passages of roughly ``words`` words (for the MiniLM encoder);
- ``source_bytes(split)``: the raw source code as bytes (for the byte-level causal LM).

A file belongs to the held-out split when ``sha1(relative path)`` ends in a digit below
``heldout_percent`` (10% by default), so the split is stable across runs and machines. The corpus
depends on the Python version (3.11's stdlib differs from 3.12's): ``corpus_info()`` records the
version, the file count and a content hash so that results say what they were measured on.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import keyword
import re
import sys
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

SPLITS = ("train", "heldout")
# Test suites and vendored data are not prose and would dominate the corpus by size.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
               "ensurepip", "turtledemo"}
_WS = re.compile(r"\s+")


def stdlib_root() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=4)
def stdlib_files(root: Optional[str] = None) -> Tuple[Path, ...]:
    """Every ``.py`` file of the stdlib (tests and site-packages excluded), sorted by relative path."""
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"no Python standard library at {base}; pass root= the folder holding os.py")
    return _py_files(base)


def _py_files(base: Path) -> Tuple[Path, ...]:
    """The ``.py`` files below ``base`` outside test / vendored folders, sorted by relative path."""
    files = [p for p in base.rglob("*.py")
             if not (set(p.relative_to(base).parts[:-1]) & _SKIP_PARTS) and p.is_file()]
    return tuple(sorted(files, key=lambda p: p.relative_to(base).as_posix()))


def split_of(relpath: str, heldout_percent: int = 10) -> str:
    """'heldout' or 'train' for a file, from a stable hash of its relative path."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be in 1..99, got {heldout_percent}")
    h = int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100
    return "heldout" if h < heldout_percent else "train"


def _files_of(split: str, root: Optional[str], heldout_percent: int) -> List[Path]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    base = Path(root) if root is not None else stdlib_root()
    return [p for p in stdlib_files(root) if split_of(p.relative_to(base).as_posix(), heldout_percent) == split]


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _docstrings(source: str) -> Iterator[str]:
    """Docstrings of a module and of its classes and functions, in source order, whitespace-folded."""
    with warnings.catch_warnings():  # old stdlib files trigger invalid-escape warnings
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return
    nodes = [tree] + sorted((n for n in ast.walk(tree)
                             if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
                            key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            text = _WS.sub(" ", doc).strip()
            if len(text.split()) >= 4 and text.isascii():   # skip stubs like "Return x."
                yield text


def docstring_passages(split: str = "train", *, words: int = 200, min_words: int = 40,
                       root: Optional[str] = None, heldout_percent: int = 10) -> List[str]:
    """Passages of about ``words`` words: consecutive docstrings of one file joined with spaces.

    A file's remainder shorter than ``min_words`` is dropped. Deterministic for a given stdlib.
    """
    if words < 1 or min_words < 1:
        raise ValueError(f"words and min_words must be >= 1, got {words}, {min_words}")
    return _passages(_files_of(split, root, heldout_percent), words, min_words)


def _passages(paths: Sequence[Path], words: int, min_words: int) -> List[str]:
    passages = []
    for path in paths:
        source = _read(path)
        if source is None:
            continue
        buf: List[str] = []
        for doc in _docstrings(source):
            buf.extend(doc.split())
            while len(buf) >= words:
                passages.append(" ".join(buf[:words]))
                buf = buf[words:]
        if len(buf) >= min_words:
            passages.append(" ".join(buf))
    return passages


# Prose-rich packages of lincomp's pinned environment (requirements/lock.txt): more training text for the
# encoder than the stdlib alone (about 1.5K passages of 256 tokens there). Held-out text stays stdlib.
EXTRA_PACKAGES = ("numpy", "scipy", "sympy", "networkx", "matplotlib", "sklearn", "torch")


@lru_cache(maxsize=16)
def package_files(name: str) -> Tuple[Path, ...]:
    """Every ``.py`` file of an installed top-level package (its tests excluded), sorted; () if absent."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return ()
    return _py_files(Path(list(spec.submodule_search_locations)[0]))


def package_docstring_passages(packages: Sequence[str] = EXTRA_PACKAGES, *, words: int = 200,
                               min_words: int = 40) -> List[str]:
    """Docstring passages (as :func:`docstring_passages`) of installed packages: extra training text.
    Packages that are not installed are skipped (:func:`packages_info` says which were used)."""
    return _passages([p for name in packages for p in package_files(name)], words, min_words)


def packages_info(packages: Sequence[str] = EXTRA_PACKAGES) -> dict:
    """Which package texts a run used: version and file count of each, and a hash of their paths and sizes."""
    from importlib.metadata import PackageNotFoundError, version

    h, out = hashlib.sha256(), {}
    for name in packages:
        files = package_files(name)
        if not files:
            continue
        try:
            ver = version({"sklearn": "scikit-learn"}.get(name, name))
        except PackageNotFoundError:
            ver = "?"
        out[name] = {"version": ver, "files": len(files)}
        for p in files:
            h.update(f"{name}/{p.name}:{p.stat().st_size};".encode())
    return {"packages": out, "sha256": h.hexdigest()[:16]}


def source_documents(split: str = "train", *, root: Optional[str] = None, heldout_percent: int = 10,
                     max_bytes: Optional[int] = None) -> List[bytes]:
    """The split's source files, one UTF-8 ``bytes`` each (followed by a blank line), in order; with
    ``max_bytes``, only the files up to the one that reaches it."""
    return _documents(_files_of(split, root, heldout_percent), lambda text: text, max_bytes)


def _documents(paths: Sequence[Path], transform, max_bytes: Optional[int]) -> List[bytes]:
    """``transform(text)`` of each readable file + a blank line, as UTF-8 (None from it: the file is left out),
    up to the file that reaches ``max_bytes``."""
    out, total = [], 0
    for path in paths:
        text = _read(path)
        text = transform(text) if text is not None else None
        if text is None:
            continue
        data = text.encode("utf-8") + b"\n\n"
        out.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return out


# Names a file keeps when its identifiers are scrambled: the language's own words, so that the code still reads
# as Python and only the file's own names (which a model must find earlier in the file) become new.
_KEEP_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | {"self", "cls"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def scramble_identifiers(source: str, seed: int) -> Optional[str]:
    """``source`` with every identifier of its code (not of comments or strings) replaced by a fresh random name,
    the same name at every occurrence in the file; keywords, builtins, ``self``/``cls`` and dunder names stay.
    A leading underscore and a capital first letter are kept (classes still look like classes).

    Why: in real source a name is defined once (an import, a ``def``, a class) and used far later, but a model
    can also memorise the common names of its training set. Fresh names per file leave only one way to predict
    a name's continuation: to find it earlier in the same file, often hundreds of bytes back. None when the
    file does not tokenise. Deterministic for ``(source, seed)``."""
    import io
    import random
    import tokenize

    rng = random.Random(f"{seed}:{hashlib.sha1(source.encode()).hexdigest()}")
    names: dict = {}
    used = set(_KEEP_NAMES)

    def fresh(name: str) -> str:
        lead = len(name) - len(name.lstrip("_"))
        while True:
            new = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 8)))
            if name[lead:lead + 1].isupper():
                new = new.capitalize()
            new = "_" * lead + new
            if new not in used:
                used.add(new)
                return new

    lines = source.splitlines(keepends=True)
    out, row, col = [], 1, 0   # copy the text between NAME tokens verbatim (no untokenize re-spacing)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.NAME:
                continue
            name = tok.string
            if name in _KEEP_NAMES or (name.startswith("__") and name.endswith("__")) or not name.isascii():
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            out.append(_span(lines, row, col, r0, c0))
            if name not in names:
                names[name] = fresh(name)
            out.append(names[name])
            row, col = r1, c1
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    out.append(_span(lines, row, col, len(lines) + 1, 0))
    return "".join(out)


def _span(lines: Sequence[str], r0: int, c0: int, r1: int, c1: int) -> str:
    """The text from (row r0, col c0) to (row r1, col c1) of ``lines`` (tokenize's 1-based rows)."""
    if r0 == r1:
        return lines[r0 - 1][c0:c1] if r0 <= len(lines) else ""
    return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + (lines[r1 - 1][:c1] if r1 <= len(lines) else "")


@lru_cache(maxsize=4)   # about 25 s for the train split; callers must not change the list
def scrambled_documents(split: str = "train", *, seed: int = 0, root: Optional[str] = None,
                        heldout_percent: int = 10, max_bytes: Optional[int] = None) -> List[bytes]:
    """:func:`source_documents` with :func:`scramble_identifiers` applied to each file (files that do not
    tokenise are dropped): source where far context matters."""
    return _documents(_files_of(split, root, heldout_percent), lambda text: scramble_identifiers(text, seed),
                      max_bytes)


def source_bytes(split: str = "train", *, root: Optional[str] = None, heldout_percent: int = 10,
                 max_bytes: Optional[int] = None) -> bytes:
    """The split's source files concatenated (each followed by a blank line), as UTF-8 bytes."""
    data = b"".join(source_documents(split, root=root, heldout_percent=heldout_percent, max_bytes=max_bytes))
    return data if max_bytes is None else data[:max_bytes]


def corpus_info(root: Optional[str] = None, heldout_percent: int = 10) -> dict:
    """What the corpus is: Python version, stdlib folder, file counts per split, a content hash."""
    base = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(root)
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(base).as_posix().encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    counts = {s: len(_files_of(s, root, heldout_percent)) for s in SPLITS}
    return {"python": sys.version.split()[0], "stdlib": str(base), "files": len(files),
            **{f"files_{s}": n for s, n in counts.items()}, "heldout_percent": heldout_percent,
            "sha256": h.hexdigest()[:16]}


def token_blocks(texts: Sequence[str], tokenizer, length: int, *, max_blocks: Optional[int] = None):
    """Pack tokenised texts into ``[N, length]`` id blocks, each ``[CLS] ... [SEP]`` with no padding.

    The texts are tokenised without special tokens, concatenated, and cut into runs of
    ``length - 2`` tokens; a short tail is dropped. Returns a LongTensor.
    """
    import torch

    if length < 3:
        raise ValueError(f"length must be >= 3 (room for [CLS] and [SEP]), got {length}")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ValueError("token_blocks needs a tokenizer with [CLS] and [SEP] tokens (a BERT-family tokenizer)")
    body = length - 2
    blocks, run = [], []
    for text in texts:
        run.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # long texts are cut here
        while len(run) >= body:
            blocks.append([cls] + run[:body] + [sep])
            run = run[body:]
            if max_blocks is not None and len(blocks) >= max_blocks:
                return torch.tensor(blocks, dtype=torch.long)
    if not blocks:
        raise ValueError(f"the texts hold fewer than {body} tokens: no block of length {length} can be made")
    return torch.tensor(blocks, dtype=torch.long)
