"""Reference side of the reward-model check; runs in the throwaway venv of the reference packages.

    <ref venv>/bin/python bench/reference/reference.py CASE_DIR

CASE_DIR holds `cases.json` (image file, caption) and `bert/vocab.txt`, written by
`ports.py prepare`. This script builds small random models with the reference packages' own
classes, in their own checkpoint formats, and scores every case with the packages' own
scoring functions:
- HPSv2 (hpsv2x): open_clip's `create_model_and_transforms` on a ViT-H-14 config cut to two
  blocks per tower (real widths, heads, patch, image size and vocabulary), saved as
  {"state_dict": ...}; scored by `hpsv2.img_score.score` with its own tokenizer and transform.
- ImageReward (image-reward): the `ImageReward` module with BLIP's ViT-L cut to two blocks and
  a two-layer BLIP BERT (`med_config.json`), the tokenizer from CASE_DIR/bert (nothing can be
  downloaded); saved as its state dict, reloaded by `ImageReward.load`, scored by `.score`.
- Aesthetic: image-reward's `AestheticScore` (the improved-aesthetic-predictor code) on an
  OpenAI `clip.model.CLIP` ViT-L/14 cut to two vision blocks; the CLIP state dict and the MLP
  head state dict are saved; scored by `.score`.
Writes the checkpoints, `reference_scores.json`, the reference token ids and the reference
preprocessed pixels into CASE_DIR.
"""

from __future__ import annotations

import json
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from PIL import Image

warnings.filterwarnings("ignore")

SEED = 1234
LAYERS = 2


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Fresh models have LayerNorms of exactly 1 and 0 and zero biases, which hide a swapped
    or dropped norm or bias in a port; give every vector parameter a little noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _spread_head(mlp: torch.nn.Module, seed: int, unit_input: bool) -> None:
    """The authors' MLP heads start with tiny weights (std 1/(n+1)), so every random model
    would give almost the same score and any port would "agree". Scale the Linear layers to
    keep the signal's size (the first one by sqrt(n) more when its input has unit norm), so
    scores spread by about one unit."""
    generator = torch.Generator().manual_seed(seed)
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, linear in enumerate(linears):
            std = 1.0 if unit_input and i == 0 else linear.in_features ** -0.5
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.1)


def hpsv2_reference(case_dir: Path, cases: list[dict]) -> dict:
    from hpsv2 import img_score
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer

    # ViT-H-14 exactly as hpsv2 ships it, but two blocks per tower.
    config = {"embed_dim": 1024,
              "vision_cfg": {"image_size": 224, "layers": LAYERS, "width": 1280,
                             "head_width": 80, "patch_size": 14},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024,
                           "heads": 16, "layers": LAYERS}}
    config_file = case_dir / "HPS-ViT-H-14-shallow.json"
    config_file.write_text(json.dumps(config))
    add_model_config(config_file)
    torch.manual_seed(SEED)
    # The arguments of hpsv2.img_score.initialize_model, on our config.
    model, _, preprocess_val = create_model_and_transforms(
        "HPS-ViT-H-14-shallow", None, precision="amp", device="cpu", jit=False,
        force_quick_gelu=False, force_custom_text=False, force_patch_dropout=False,
        force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
        with_region_predictor=False)
    _perturb(model, SEED)
    checkpoint = case_dir / "HPS_v2_shallow.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    img_score.model_dict["model"] = model
    img_score.model_dict["preprocess_val"] = preprocess_val
    scores = [float(img_score.score(Image.open(case_dir / c["image"]), c["caption"],
                                    cp=str(checkpoint))[0]) for c in cases]
    tokenizer = get_tokenizer("ViT-H-14")
    tokens = tokenizer([c["caption"] for c in cases]).tolist()
    pixels = torch.stack([preprocess_val(Image.open(case_dir / c["image"])) for c in cases])
    torch.save(pixels, case_dir / "pixels_hpsv2.pt")
    return {"scores": scores, "tokens": tokens, "checkpoint": checkpoint.name}


def imagereward_reference(case_dir: Path, cases: list[dict]) -> dict:
    import ImageReward as RM
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    bert_dir = str(case_dir / "bert")

    class LocalBertTokenizer(BertTokenizer):
        """bert-base-uncased cannot be downloaded here: BLIP's init_tokenizer reads ours."""

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return BertTokenizer.from_pretrained(bert_dir)

    def shallow_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0,
                    drop_path_rate=0):
        # BLIP's 'large' ViT (ImageReward's), two blocks instead of 24.
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=1024,
                                 depth=LAYERS, num_heads=16, drop_path_rate=0.1), 1024

    blip.BertTokenizer = LocalBertTokenizer
    blip_pretrain.create_vit = shallow_vit
    vocab_size = len(LocalBertTokenizer.from_pretrained("bert-base-uncased")) + 2  # [DEC] [ENC]
    med_config = {  # ImageReward's med_config.json (BLIP's BERT-base), two layers
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": vocab_size, "encoder_width": 1024, "add_cross_attention": True}
    med_path = case_dir / "med_config.json"
    med_path.write_text(json.dumps(med_config))
    torch.manual_seed(SEED)
    model = RM.ImageReward(med_config=str(med_path), device="cpu")
    _perturb(model, SEED + 1)
    _spread_head(model.mlp, SEED + 1, unit_input=False)
    checkpoint = case_dir / "ImageReward_shallow.pt"
    torch.save(model.state_dict(), checkpoint)
    reloaded = RM.load(str(checkpoint), device="cpu", med_config=str(med_path))
    with torch.no_grad():
        scores = [float(reloaded.score(c["caption"], Image.open(case_dir / c["image"])))
                  for c in cases]
    tokens = reloaded.blip.tokenizer([c["caption"] for c in cases], padding="max_length",
                                     truncation=True, max_length=35).input_ids
    pixels = torch.stack([reloaded.preprocess(Image.open(case_dir / c["image"]))
                          for c in cases])
    torch.save(pixels, case_dir / "pixels_clip.pt")
    return {"scores": scores, "tokens": tokens, "checkpoint": checkpoint.name}


def aesthetic_reference(case_dir: Path, cases: list[dict]) -> dict:
    import clip
    from ImageReward.models.AestheticScore import MLP, AestheticScore

    torch.manual_seed(SEED)
    # OpenAI's ViT-L/14 (the published head's CLIP), two vision blocks and one text block.
    clip_model = clip.model.CLIP(embed_dim=768, image_resolution=224, vision_layers=LAYERS,
                                 vision_width=1024, vision_patch_size=14, context_length=77,
                                 vocab_size=49408, transformer_width=768, transformer_heads=12,
                                 transformer_layers=1).float()
    _perturb(clip_model, SEED + 2)
    # AestheticScore.__init__ downloads ViT-L/14; set up the same attributes by hand.
    scorer = AestheticScore.__new__(AestheticScore)
    torch.nn.Module.__init__(scorer)
    scorer.device = "cpu"
    scorer.clip_model = clip_model.eval()
    scorer.preprocess = clip.clip._transform(224)
    scorer.mlp = MLP(768).eval()
    _spread_head(scorer.mlp, SEED + 2, unit_input=True)
    torch.save(clip_model.state_dict(), case_dir / "openai_clip_shallow.pt")
    torch.save(scorer.mlp.state_dict(), case_dir / "aesthetic_head.pth")
    with torch.no_grad():
        scores = [float(scorer.score(c["caption"], str(case_dir / c["image"]))) for c in cases]
    return {"scores": scores, "checkpoint": "aesthetic_head.pth",
            "clip": "openai_clip_shallow.pt"}


def main() -> None:
    case_dir = Path(sys.argv[1])
    cases = json.loads((case_dir / "cases.json").read_text())
    results = {"hpsv2": hpsv2_reference(case_dir, cases),
               "imagereward": imagereward_reference(case_dir, cases),
               "aesthetic": aesthetic_reference(case_dir, cases),
               "versions": {p: version(p) for p in ("hpsv2x", "image-reward", "open-clip-torch",
                                                    "openai-clip", "torch", "torchvision",
                                                    "transformers", "timm")
                            if _installed(p)}}
    (case_dir / "reference_scores.json").write_text(json.dumps(results, indent=1))
    print(f"reference scores for {len(cases)} cases written to {case_dir}")


def _installed(package: str) -> bool:
    try:
        version(package)
    except Exception:
        return False
    return True


if __name__ == "__main__":
    main()
