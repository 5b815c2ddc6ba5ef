"""The tiny world of the offline `tiny` profile: synthetic Pick-a-Pic v2 data and small random
models.

Everything here is built by the project itself, in the real formats (hub-layout Parquet shards,
`save_pretrained` folders), so every stage runs end to end with no hub access. Captions come
from a small grammar of drawn scenes ("a red circle on a blue background"); in each pair one
image draws the caption faithfully and the other gets one attribute wrong, so a preference
signal exists for the pipeline to learn.
"""

from __future__ import annotations

import io
import itertools
import random
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from smpo_core.schema import PICKAPIC_SCHEMA
from smpo_core.store import atomic_path, build_once

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle", "diamond")
# Unit direction of the first object as seen from the second, in image coordinates (y down).
_RELATIONS = {
    "above": (0, -1), "below": (0, 1), "to the left of": (-1, 0), "to the right of": (1, 0)
}
_NEUTRAL_BACKGROUND = (128, 128, 128)  # two-object scenes: a grey that no caption names
_GENERATORS = ("sd-1.5", "sd-2.1", "sdxl-beta", "dreamlike-2.0")
_IMAGE_SIZE = 64
_JPEG_QUALITY = 90
_POOL_SEED = 20250602  # fixed for ever: keeps the train/evaluation caption split stable
_CREATED_AT_BASE = datetime(2023, 4, 1, 12, 0, 0)  # a constant, so the bytes never depend on now
_MAX_CAPTIONS = 48


class Scene(NamedTuple):
    """One drawable caption: one object on a named background, or two objects in a relation."""

    colour: str
    shape: str
    background: str = ""
    relation: str = ""
    other_colour: str = ""
    other_shape: str = ""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_caption(scene: Scene) -> str:
    """The caption a faithful image of `scene` depicts."""
    first = f"{_article(scene.colour)} {scene.colour} {scene.shape}"
    if scene.relation:
        other = f"{_article(scene.other_colour)} {scene.other_colour} {scene.other_shape}"
        return f"{first} {scene.relation} {other}"
    return f"{first} on {_article(scene.background)} {scene.background} background"


def _grammar() -> tuple[list[Scene], list[Scene]]:
    """Every caption the grammar can say: (one-object scenes, two-object scenes)."""
    singles = [
        Scene(c, s, background=b) for c in _COLOURS for s in _SHAPES for b in _COLOURS if b != c
    ]
    objects = [(c, s) for c in _COLOURS for s in _SHAPES]
    pairs = [
        Scene(c, s, relation=r, other_colour=c2, other_shape=s2)
        for c, s in objects
        for r in _RELATIONS
        for c2, s2 in objects
        if (c, s) != (c2, s2)
    ]
    return singles, pairs


def caption_words() -> list[str]:
    """The caption grammar's sorted vocabulary: the words the tiny tokenizer keeps whole."""
    singles, pairs = _grammar()
    return sorted({word for scene in singles + pairs for word in scene_caption(scene).split()})


def _scene_pools(held_out: bool) -> tuple[list[Scene], list[Scene]]:
    """A seed-independent split of the grammar: evaluation prompts never occur in training data."""
    rng = random.Random(_POOL_SEED)
    pools = []
    for group in _grammar():
        rng.shuffle(group)
        cut = len(group) // 4
        pools.append(group[:cut] if held_out else group[cut:])
    return pools[0], pools[1]


def _sample_scenes(n: int, rng: random.Random, held_out: bool) -> list[Scene]:
    singles, pairs = _scene_pools(held_out)
    n_single = min(n // 2, len(singles))
    if n - n_single > len(pairs):
        raise ValueError(f"asked for {n} captions; the synthetic grammar holds at most "
                         f"{len(singles) + len(pairs)} in this pool")
    scenes = rng.sample(singles, n_single) + rng.sample(pairs, n - n_single)
    rng.shuffle(scenes)
    return scenes


def synthetic_prompts(n: int, seed: int) -> list[str]:
    """`n` evaluation captions from the grammar, disjoint from every synthetic training caption:
    one-object and two-object scenes alternate while the former last. The first k of them are
    `synthetic_prompts(k, seed)`, so one prompt file serves every smaller prompt count."""
    singles, pairs = _scene_pools(held_out=True)
    if n > len(singles) + len(pairs):
        raise ValueError(f"asked for {n} captions; the synthetic grammar holds at most "
                         f"{len(singles) + len(pairs)} in this pool")
    rng = random.Random(f"prompts-{seed}")
    rng.shuffle(singles)
    rng.shuffle(pairs)
    alternating = [scene for couple in zip(singles, pairs, strict=False) for scene in couple]
    return [scene_caption(s) for s in (alternating + pairs[len(singles):])[:n]]


def _mistaken_scene(scene: Scene, rng: random.Random) -> Scene:
    """The unfaithful image's scene: exactly one attribute of the caption drawn wrong."""
    error = rng.choice(("colour", "shape", "setting"))
    if error == "colour":
        wrong = [c for c in _COLOURS if c not in (scene.colour, scene.background)]
        return scene._replace(colour=rng.choice(wrong))
    if error == "shape":
        return scene._replace(shape=rng.choice([s for s in _SHAPES if s != scene.shape]))
    if scene.relation:
        return scene._replace(relation=rng.choice([r for r in _RELATIONS if r != scene.relation]))
    wrong = [c for c in _COLOURS if c not in (scene.background, scene.colour)]
    return scene._replace(background=rng.choice(wrong))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, x: float, y: float,
                r: float) -> None:
    fill = _COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def _draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """A 64x64 drawing of `scene`; jittered so no two drawings coincide by accident."""
    base = _COLOURS.get(scene.background, _NEUTRAL_BACKGROUND)
    image = Image.new("RGB", (_IMAGE_SIZE, _IMAGE_SIZE), tuple(
        min(255, max(0, v + rng.randint(-8, 8))) for v in base))
    draw = ImageDraw.Draw(image)
    centre = _IMAGE_SIZE / 2
    if not scene.relation:
        x, y = centre + rng.uniform(-4, 4), centre + rng.uniform(-4, 4)
        _draw_shape(draw, scene.shape, scene.colour, x, y, rng.uniform(12, 16))
        return image
    dx, dy = _RELATIONS[scene.relation]
    offset = rng.uniform(12, 16)
    for sign, colour, shape in ((1, scene.colour, scene.shape),
                                (-1, scene.other_colour, scene.other_shape)):
        x = centre + sign * dx * offset + rng.uniform(-2, 2)
        y = centre + sign * dy * offset + rng.uniform(-2, 2)
        _draw_shape(draw, shape, colour, x, y, rng.uniform(8, 10))
    return image


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _truncated_jpeg(data: bytes) -> bytes:
    """Keep the headers and a sliver of scan data: PIL opens the file but cannot decode pixels."""
    start_of_scan = data.index(b"\xff\xda")
    header_length = int.from_bytes(data[start_of_scan + 2:start_of_scan + 4], "big")
    return data[:start_of_scan + 2 + header_length + 8]


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def expected_counts(num_pairs: int) -> dict[str, int]:
    """Rows per anomaly for a split of `num_pairs` rows; each anomaly sits in its own rows.

    "flipped" rows are labelled but the unfaithful image won (label noise); "usable" rows are
    what survives dropping ties, unlabelled, identical and undecodable pairs.
    """
    corrupt = round(0.02 * num_pairs)
    if num_pairs >= 100:
        corrupt = max(corrupt, 2)
    counts = {"rows": num_pairs, "ties": round(0.10 * num_pairs),
              "no_label": round(0.05 * num_pairs), "identical": round(0.05 * num_pairs),
              "corrupt": corrupt, "flipped": round(0.10 * num_pairs)}
    dropped = counts["ties"] + counts["no_label"] + counts["identical"] + corrupt
    return counts | {"usable": num_pairs - dropped}


def _anomaly_roles(num_pairs: int, rng: random.Random) -> list[str]:
    counts = expected_counts(num_pairs)
    roles = [role for role in ("ties", "no_label", "identical", "corrupt", "flipped")
             for _ in range(counts[role])]
    roles += ["clean"] * (num_pairs - len(roles))
    rng.shuffle(roles)
    return roles


def _pair_row(scene: Scene, role: str, rng: random.Random) -> dict:
    """One Pick-a-Pic row (without the ids and times the caller assigns) playing `role`."""
    faithful = rng.randrange(2)
    images = [_jpeg_bytes(_draw_scene(scene, rng)),
              _jpeg_bytes(_draw_scene(_mistaken_scene(scene, rng), rng))]
    if faithful:
        images.reverse()
    uids = [_uid(rng), _uid(rng)]
    models = rng.sample(_GENERATORS, 2)
    winner = 1 - faithful if role == "flipped" else faithful
    if role == "identical":
        # The very same image shown twice: only `are_different` tells it apart.
        images[1], uids[1], models[1], winner = images[0], uids[0], models[0], 0
    if role == "corrupt":
        side = rng.randrange(2)
        images[side] = _truncated_jpeg(images[side])
    labels, best = [float(winner == 0), float(winner == 1)], uids[winner]
    if role == "ties":
        labels, best = [0.5, 0.5], ""
    elif role == "no_label":
        labels, best = [0.0, 0.0], ""  # no preference recorded; downstream drops on has_label
    return {
        "are_different": role != "identical", "best_image_uid": best,
        "caption": scene_caption(scene), "has_label": role != "no_label",
        "image_0_uid": uids[0], "image_0_url": f"https://images.example/{uids[0]}.png",
        "image_1_uid": uids[1], "image_1_url": f"https://images.example/{uids[1]}.png",
        "jpg_0": images[0], "jpg_1": images[1], "label_0": labels[0], "label_1": labels[1],
        "model_0": models[0], "model_1": models[1],
    }


def _pickapic_rows(num_pairs: int, rng: random.Random) -> list[dict]:
    n_captions = min(_MAX_CAPTIONS, max(1, num_pairs // 4))
    scenes = _sample_scenes(n_captions, rng, held_out=False)
    scene_of_row = [scenes[i % n_captions] for i in range(num_pairs)]
    rng.shuffle(scene_of_row)
    per_prompt = Counter(scene_of_row)
    users = [rng.randrange(1, 2**31) for _ in range(max(3, num_pairs // 10))]
    ranking_ids = rng.sample(range(10**6, 10**7), num_pairs)
    roles = _anomaly_roles(num_pairs, rng)
    rows = []
    for i, (scene, role) in enumerate(zip(scene_of_row, roles, strict=True)):
        rows.append(_pair_row(scene, role, rng) | {
            "created_at": _CREATED_AT_BASE + timedelta(seconds=17 * i),
            "ranking_id": ranking_ids[i], "user_id": rng.choice(users),
            "num_example_per_prompt": per_prompt[scene]})
    return rows


def write_synthetic_pickapic(out_dir: Path, num_pairs: int = 320, seed: int = 0,
                             split: str = "train", num_files: int = 2) -> list[Path]:
    """Write a Pick-a-Pic v2 split in the hub layout `out_dir/data/{split}-XXXXX-of-NNNNN.parquet`.

    Deterministic in (seed, split): the same arguments give byte-identical files; the rows of
    each kind (ties, unlabelled, ...) are `expected_counts(num_pairs)`. Returns the shard paths.
    """
    if num_pairs < 1 or not 1 <= num_files <= num_pairs:
        raise ValueError(f"need num_pairs >= 1 and 1 <= num_files <= num_pairs; "
                         f"got num_pairs={num_pairs}, num_files={num_files}")
    rows = _pickapic_rows(num_pairs, random.Random(f"pickapic-{seed}-{split}"))
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_files):
        shard = rows[i * num_pairs // num_files:(i + 1) * num_pairs // num_files]
        table = pa.Table.from_pylist(shard, schema=PICKAPIC_SCHEMA)
        path = data_dir / f"{split}-{i:05d}-of-{num_files:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        paths.append(path)
    # Shards of an earlier call with another num_files would otherwise be read as extra rows.
    for stale in set(data_dir.glob(f"{split}-*-of-*.parquet")) - set(paths):
        stale.unlink()
    return paths


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the best-ranked adjacent pair."""
    while len(symbols) > 1:
        pair = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if tuple(symbols[i:i + 2]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into one token. Each new merge ranks last, so it can only
    fire once earlier merges are exhausted and never changes how earlier words tokenize."""
    from smpo_core.rewards.tokenizers import bytes_to_unicode  # the package imports torch

    table = bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = [table[b] for b in word.lower().encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols := _apply_merges(symbols, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
    return list(ranks)


def build_clip_tokenizer(words: Iterable[str] | None = None) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer built in memory; each of `words` (default: the caption
    grammar's vocabulary) is one token, anything else falls back to byte tokens."""
    from smpo_core.rewards.tokenizers import clip_tokenizer

    return clip_tokenizer(_word_merges(caption_words() if words is None else words))


def _text_config(tokenizer: CLIPTokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _tiny_vae(resolution: int, scaling_factor: float):
    """A small random AutoencoderKL with a downsampling factor of 2 and 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
        layers_per_block=1, latent_channels=4, sample_size=resolution,
        scaling_factor=scaling_factor)


def _sd_scheduler():
    """DDIM with the noise schedule SD1.5 and SDXL were trained on."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


TINY_UNET = {"layers_per_block": 1, "block_out_channels": (32, 64),
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 8}
# ~20M parameters: a size at which a CPU step costs seconds, as a GPU's SD1.5 step does, and
# the UNet, not the Python around it, dominates (bench/).
MEDIUM_UNET = {"layers_per_block": 2, "block_out_channels": (64, 128, 256),
               "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
               "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               "attention_head_dim": 8}


def build_tiny_diffusion(out_dir: Path, seed: int = 0, resolution: int = 32,
                         unet: dict | None = None) -> Path:
    """Save a small random SD1.5-shaped `StableDiffusionPipeline` (VAE factor 2) to `out_dir`.

    `unet`: the UNet's size (block channels, layers, block types), TINY_UNET by default,
    MEDIUM_UNET for the benchmarks' ~20M-parameter model.
    Reload it with `StableDiffusionPipeline.from_pretrained(out_dir, local_files_only=True)`.
    An `out_dir` that already holds a model is returned as it is, whatever its seed.
    """
    if resolution % 4:
        raise ValueError(f"resolution must be a multiple of 4 (VAE factor 2, one UNet "
                         f"downsample); got {resolution}")

    def build(path: Path) -> None:
        # Imported here: the data writer above must stay cheap to import (no diffusers).
        import torch
        from diffusers import (
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = build_clip_tokenizer()
        with torch.random.fork_rng(devices=[]):  # seed the weights, not the caller's stream
            torch.manual_seed(seed)
            model = UNet2DConditionModel(
                sample_size=resolution // 2, in_channels=4, out_channels=4,
                cross_attention_dim=32, **(unet or TINY_UNET))
            vae = _tiny_vae(resolution, scaling_factor=0.18215)
            text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))
        scheduler = _sd_scheduler()
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipeline.save_pretrained(path)

    return build_once(out_dir, "model_index.json", build)


def build_tiny_clip_reward(out_dir: Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a small random `CLIPModel` + `CLIPProcessor` to `out_dir`, laid out like PickScore.

    Reload with `CLIPModel.from_pretrained(out_dir)` and `CLIPProcessor.from_pretrained(out_dir)`.
    An `out_dir` that already holds a model is returned as it is, whatever its seed.
    """
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of the patch size 8; got {image_size}")

    def build(path: Path) -> None:
        import torch

        # The PIL backend by name: plain CLIPImageProcessor warns when torchvision is absent.
        from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

        from smpo_core.rewards.preprocess import CLIP_MEAN, CLIP_STD

        tokenizer = build_clip_tokenizer()
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "image_size": image_size, "patch_size": 8}
        config = CLIPConfig(text_config=_text_config(tokenizer), vision_config=vision,
                            projection_dim=32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        model.save_pretrained(path)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)

    return build_once(out_dir, "config.json", build)


def build_tiny_sdxl(out_dir: Path, seed: int = 0, resolution: int = 32) -> Path:
    """Save a small random SDXL-shaped `StableDiffusionXLPipeline` (two text encoders, a UNet
    conditioned on the pooled text embedding and size/crop ids, VAE factor 2) to `out_dir`."""
    if resolution % 4:
        raise ValueError(f"resolution must be a multiple of 4; got {resolution}")

    def build(path: Path) -> None:
        import torch
        from diffusers import (
            StableDiffusionXLPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        tokenizer = build_clip_tokenizer()
        text = _text_config(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(
                sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D",
                                                               "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                # 6 size/crop ids x 8 + the second encoder's 32-wide pooled projection.
                projection_class_embeddings_input_dim=6 * 8 + 32,
                cross_attention_dim=2 * text["hidden_size"])
            vae = _tiny_vae(resolution, scaling_factor=0.13025)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text,
                                                                        projection_dim=32))
        scheduler = _sd_scheduler()
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
        pipeline.save_pretrained(path)

    return build_once(out_dir, "model_index.json", build)


def trainable_pairs(out_dir: Path, count: int, seed: int = 0) -> list[dict]:
    """`count` synthetic pairs that pass the download filters, as rows with a `pair_id`: for
    tests and benchmarks that need inputs to inversion or training without the stages."""
    from smpo_core.pickapic import classify

    files = write_synthetic_pickapic(out_dir, num_pairs=max(64, 4 * count), seed=seed,
                                     num_files=1)
    rows = [row for row in pq.read_table(files[0]).to_pylist()
            if classify(row, set())[0] is None]
    return [dict(row, pair_id=row["ranking_id"]) for row in rows[:count]]
