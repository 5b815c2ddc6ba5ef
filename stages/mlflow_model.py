"""The MLflow model of a train stage's weights: a diffusers pipeline, the base model with the
trained UNet swapped in or the LoRA adapters loaded.

MLflow logs this file itself as the model's code ("models from code"), so loading the model
needs MLflow, torch and diffusers only, not this repository:

    model = mlflow.pyfunc.load_model("models:/<model id>")
    pipe = model.unwrap_python_model().pipeline          # a diffusers pipeline
    images = model.predict(["a red cube on a table"])   # or: draw through pyfunc

The model's config (`pipeline`; MLflow shows it as the run's `pipeline/...` params) names the
base (`base`, `revision`, `vae`: a diffusers folder or hub id, read when the model loads) and
`weights_kind` (`unet` or `lora`); the weights themselves are the model's `weights` artifact.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel


class TunedPipeline(mlflow.pyfunc.PythonModel):
    """Loads the tuned diffusers pipeline; `predict` draws one image per prompt."""

    # The logged signature is this model's schema, and predict has no type hints (MLflow would
    # read them as a second one). MLflow's check for them would only warn, at every log, that
    # they are missing; this class attribute is how MLflow's own ChatModel skips that check.
    _skip_type_hint_validation = True

    def load_context(self, context):
        config = context.model_config["pipeline"]
        dtype = torch.float32
        parts: dict[str, Any] = {}
        if config.get("vae"):
            parts["vae"] = AutoencoderKL.from_pretrained(config["vae"], dtype=dtype)
        if config["weights_kind"] == "unet":
            parts["unet"] = UNet2DConditionModel.from_pretrained(context.artifacts["weights"],
                                                                 dtype=dtype)
        if "safety_checker" in DiffusionPipeline.load_config(config["base"],
                                                             revision=config.get("revision")):
            parts |= {"safety_checker": None, "requires_safety_checker": False}
        pipeline = DiffusionPipeline.from_pretrained(config["base"], dtype=dtype,
                                                     revision=config.get("revision"), **parts)
        if config["weights_kind"] == "lora":
            pipeline.load_lora_weights(context.artifacts["weights"])
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline.to("cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input, params=None):
        """Prompts (a list, or a DataFrame's `prompt` column) to images as uint8 arrays
        (height x width x 3); params: num_inference_steps, guidance_scale, seed."""
        prompts = list(model_input["prompt"] if hasattr(model_input, "columns") else model_input)
        params = params or {}
        generator = torch.Generator("cpu").manual_seed(int(params.get("seed", 0)))
        images = self.pipeline(prompts, generator=generator,
                               num_inference_steps=int(params.get("num_inference_steps", 25)),
                               guidance_scale=float(params.get("guidance_scale", 7.5))).images
        return [np.asarray(image) for image in images]


mlflow.models.set_model(TunedPipeline())
