"""`builtin:NAME` references: the synthetic worlds' data and models, built into the store on
first use (`<store>/builtin/NAME/`).

A setting such as `model.base: builtin:tiny-sd` then reads them through the same paths as real
ones (a Parquet folder, `from_pretrained` folders, checkpoint files, a prompt file), so the
offline profiles exercise the real loading code. To add a builtin: one entry in BUILTINS, a
function that builds it into its folder (once: `store.build_once`) and returns the path the
setting stands for. Model writers are imported where used: they bring torch, and resolving
a data or prompt builtin must not wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smpo_core.building import one_at_a_time
from smpo_core.errors import SmpoError
from smpo_core.store import Store, build_once
from smpo_core.worlds import tiny

PREFIX = "builtin:"
TINY_PAIRS = 320  # rows of the tiny Pick-a-Pic train split
TINY_PROMPTS_SEED = 1234
TINY_PROMPTS = 1000  # the held-out captions written; evaluate.num_prompts takes the first N
TOY_PAIRS = 256  # pairs sampled from the toy base model
TOY_PAIR_STEPS = 10  # DDIM steps per pair image: pairs are built on first use
TOY_ANNOTATORS = 16
TOY_PROMPTS_SEED = 72


def _tiny_pickapic(folder: Path) -> Path:
    return build_once(folder, "data", lambda path: tiny.write_synthetic_pickapic(
        path, num_pairs=TINY_PAIRS, seed=0))


def _tiny_prompts(folder: Path) -> Path:
    """Held-out captions of the tiny grammar in a prompt/style table: two styles (one shape,
    two shapes), so the offline profiles exercise per-style reporting as HPDv2 needs it."""
    def build(path: Path) -> None:
        prompts = tiny.synthetic_prompts(TINY_PROMPTS, seed=TINY_PROMPTS_SEED)
        rows = [f"{p}\t{'one shape' if p.endswith(' background') else 'two shapes'}"
                for p in prompts]
        (path / "prompts.tsv").write_text("prompt\tstyle\n" + "\n".join(rows) + "\n")

    return build_once(folder, "prompts.tsv", build) / "prompts.tsv"


def _tiny_hpsv2(folder: Path) -> Path:
    """An HPSv2-format checkpoint file and the CLIP tokenizer folder it pairs with."""
    from smpo_core.worlds import checkpoints

    def build(path: Path) -> None:
        checkpoints.save_tiny_clip_tokenizer(path / "tokenizer")
        checkpoints.write_tiny_hpsv2_checkpoint(path / "HPS_v2.1_compressed.pt", seed=0)

    return build_once(folder, "HPS_v2.1_compressed.pt", build)


def _tiny_imagereward(folder: Path) -> Path:
    """An ImageReward.pt-format file and the BERT WordPiece vocabulary folder it pairs with."""
    from smpo_core.worlds import checkpoints

    def build(path: Path) -> None:
        vocab = checkpoints.write_bert_vocab(path / "bert", tiny.caption_words())
        tokens = len((vocab / "vocab.txt").read_text().split()) + 2  # + [DEC], [ENC]
        checkpoints.write_tiny_imagereward_checkpoint(path / "ImageReward.pt", vocab_size=tokens)

    return build_once(folder, "ImageReward.pt", build)


def _tiny_aesthetic(folder: Path) -> Path:
    """A LAION-aesthetic-format MLP head for the tiny CLIP's 32-wide image embedding."""
    from smpo_core.worlds import checkpoints

    head = "sac+logos+ava1-l14-linearMSE.pth"
    return build_once(folder, head, lambda path: checkpoints.write_tiny_aesthetic_head(
        path / head, in_features=32)) / head


def _toy_weights(name: str) -> Path:
    """Weights the project pretrained and committed (smpo_core/worlds/toy/weights/)."""
    from smpo_core.worlds.toy import WEIGHTS

    path = WEIGHTS / name
    if not path.is_dir():
        raise SmpoError(f"builtin:{name}: no weights at {path}; rebuild them with the command "
                        f"in smpo_core/worlds/toy/README.md")
    return path


def _toy_population(folder: Path) -> Path:
    """The toy world's annotators: their hidden weights, the ground truth of its metrics."""
    from smpo_core.worlds.toy import annotators

    return build_once(folder, "population.json", lambda path: annotators.population(
        count=TOY_ANNOTATORS, seed=0).save(path / "population.json")) / "population.json"


def _toy_pickapic(folder: Path) -> Path:
    """Pairs sampled from the pretrained toy model, labelled by the toy population: the
    committed copy (sampling them takes minutes on a CPU), else built into the store."""
    from smpo_core.worlds.toy import WEIGHTS, pairs
    from smpo_core.worlds.toy.annotators import Population

    if (WEIGHTS / "toy-pickapic" / "data").is_dir():
        return WEIGHTS / "toy-pickapic"
    population = Population.load(_toy_population(folder.parent / "toy-population"))
    return build_once(folder, "data", lambda path: pairs.write_toy_pickapic(
        path, _toy_weights("toy-sd"), population, num_pairs=TOY_PAIRS, seed=0,
        steps=TOY_PAIR_STEPS))


def _toy_prompts(folder: Path) -> Path:
    """Every toy caption once, in a fixed shuffled order, styled by background."""
    import random

    from smpo_core.worlds.toy import scenes

    def build(path: Path) -> None:
        captions = scenes.all_captions()
        random.Random(TOY_PROMPTS_SEED).shuffle(captions)
        rows = [f"{c}\t{c.split()[-2]} background" for c in captions]
        (path / "prompts.tsv").write_text("prompt\tstyle\n" + "\n".join(rows) + "\n")

    return build_once(folder, "prompts.tsv", build) / "prompts.tsv"


def _beside(name: str, build: Callable[[Path], Path], part: str) -> Callable[[Path], Path]:
    """A part of another builtin (e.g. the tokenizer that ships with a checkpoint)."""
    return lambda folder: build(folder.parent / name) / part


#: name -> builder(folder) -> the path `builtin:name` stands for.
BUILTINS: dict[str, Callable[[Path], Path]] = {
    "tiny-pickapic": _tiny_pickapic,
    "tiny-prompts": _tiny_prompts,
    "tiny-sd": lambda folder: tiny.build_tiny_diffusion(folder, seed=0),
    "tiny-sdxl": lambda folder: tiny.build_tiny_sdxl(folder, seed=0),
    "tiny-clip": lambda folder: tiny.build_tiny_clip_reward(folder, seed=0),
    "tiny-hpsv2": lambda folder: _tiny_hpsv2(folder) / "HPS_v2.1_compressed.pt",
    "tiny-hpsv2-tokenizer": _beside("tiny-hpsv2", _tiny_hpsv2, "tokenizer"),
    "tiny-imagereward": lambda folder: _tiny_imagereward(folder) / "ImageReward.pt",
    "tiny-imagereward-bert": _beside("tiny-imagereward", _tiny_imagereward, "bert"),
    "tiny-aesthetic": _tiny_aesthetic,
    "toy-sd": lambda folder: _toy_weights("toy-sd"),
    "toy-reward": lambda folder: _toy_weights("toy-reward"),
    "toy-population": _toy_population,
    "toy-pickapic": _toy_pickapic,
    "toy-prompts": _toy_prompts,
}


def is_builtin(ref: str | None) -> bool:
    return ref is not None and ref.startswith(PREFIX)


@one_at_a_time
def resolve(ref: str | None, store_root: Path) -> str | None:
    """A builtin reference becomes its path in the store (built if missing); others pass."""
    if not is_builtin(ref):
        return ref
    name = ref[len(PREFIX):]
    if name not in BUILTINS:
        raise SmpoError(f"{ref!r}: unknown builtin; expected one of "
                        f"{', '.join(PREFIX + n for n in BUILTINS)}")
    return str(BUILTINS[name](Store(store_root).builtin_dir(name)))
