"""The Python standard library as a training and evaluation corpus, with one fixed held-out rule.

Every machine with Python has this text, so the bundled model can be trained and evaluated anywhere without a
download. Training, perplexity evaluation and the tests all split it with ``is_held_out``, so a reported
held-out perplexity is always on files the model never saw.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str) -> bool:
    """The held-out rule: the SHA-1 hex digest of the POSIX path relative to the corpus root ends in "0"."""
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest().endswith("0")


def corpus_files(root: Path | None = None, *, split: str = "train") -> list[Path]:
    """Every ``*.py`` under ``root`` (default: the stdlib, without ``site-packages``), sorted, in one split.

    ``split`` is "train", "heldout" or "all".
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split: must be 'train', 'heldout' or 'all', got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if "site-packages" in relative.parts or not path.is_file():
            continue
        held_out = is_held_out(relative.as_posix())
        if split == "all" or held_out == (split == "heldout"):
            files.append(path)
    return files


def read_source(path: Path) -> str:
    """A source file's text; the few stdlib files that are not valid UTF-8 get replacement characters."""
    return path.read_text(encoding="utf-8", errors="replace")


def iter_chunks(files: list[Path], max_chars: int = 2000) -> Iterator[str]:
    """Files as runs of whole lines of at most ~``max_chars`` characters, newlines kept.

    The tokenizer trainer takes "sentences"; giving it multi-line chunks (not single lines) lets it learn
    pieces that contain newlines, such as ``"):\\n"``, which code is full of.
    """
    for path in files:
        chunk = ""
        for line in read_source(path).splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > max_chars:
                yield chunk
                chunk = ""
            chunk += line
        if chunk:
            yield chunk


def function_sources(
    split: str = "heldout", *, min_lines: int = 6, max_lines: int = 30, files: list[Path] | None = None
) -> Iterator[tuple[str, str]]:
    """(name, source) of the corpus's top-level functions of ``min_lines``..``max_lines`` lines, in file order
    (``files``: these instead of the stdlib's ``split``): the speculative-decoding prompts and copy task."""
    for path in corpus_files(split=split) if files is None else files:
        text = read_source(path)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
                source = ast.get_source_segment(text, node)
                if source and not source.startswith("@"):
                    yield node.name, source


def repeat_prompt(name: str, source: str) -> str:
    """An input-grounded prompt: a function, then the request to write it again renamed, so the answer mostly
    copies the prompt (what prompt-lookup speculation is for)."""
    renamed = source.replace(f"def {name}(", f"def {name}_v2(", 1)
    return f"{source}\n\n\n# {name}_v2: the same as {name}, under a new name.\n{renamed.splitlines()[0]}\n"
