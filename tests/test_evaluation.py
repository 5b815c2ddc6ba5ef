"""Prompt sets, win rates and summaries of the evaluate stage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smpo_core.errors import SmpoError
from smpo_core.evaluation import load_prompts, summarise, win_rate


def test_win_rate_counts_ties_half():
    tuned = np.array([1.0, 2.0, 3.0, 4.0])
    base = np.array([0.0, 2.0, 5.0, 1.0])
    assert win_rate(tuned, base) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_summary_has_means_medians_and_win_rate():
    summary = summarise({"m": np.array([1.0, 2.0, 9.0])}, {"m": np.array([2.0, 2.0, 3.0])})
    assert summary["m"] == pytest.approx({"base_mean": 4.0, "base_median": 2.0,
                                          "tuned_mean": 7 / 3, "tuned_median": 2.0,
                                          "win_rate": 0.5})


def test_prompt_sets_from_text_and_parquet(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\na dog\na cat\na bird\n")
    assert load_prompts(str(text), 10) == ["a cat", "a dog", "a bird"]
    parti = tmp_path / "parti.parquet"
    pq.write_table(pa.table({"Prompt": ["x", "y", "x"], "Category": ["a", "b", "c"]}), parti)
    assert load_prompts(str(parti), 10) == ["x", "y"]


def test_bad_prompt_sets_say_what_was_expected(tmp_path):
    with pytest.raises(SmpoError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"), 3)
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"other": ["x"]}), table)
    with pytest.raises(SmpoError, match="has none of the columns caption, prompt"):
        load_prompts(str(table), 3)


@pytest.mark.integration
def test_generation_keeps_each_image_and_resumes_without_redrawing(tmp_path):
    import torch

    from smpo_core.evaluation import build_pipeline, generate
    from smpo_core.worlds.tiny import build_tiny_diffusion

    pipe = build_pipeline(str(build_tiny_diffusion(tmp_path / "sd")), torch.device("cpu"),
                          torch.float32)
    args = dict(seed=3, num_inference_steps=2, guidance_scale=5.0, resolution=32, batch_size=2)
    prompts = ["a red circle", "a blue square", "a green diamond"]
    first = generate(pipe, prompts, save_to=tmp_path / "images", **args)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == \
        ["0000.png", "0001.png", "0002.png"]
    (tmp_path / "images" / "0002.png").unlink()  # a run killed during the last batch

    calls = []
    original = pipe.__class__.__call__

    def counting(self, *a, **k):
        calls.append(a[0] if a else k.get("prompt"))
        return original(self, *a, **k)

    pipe.__class__.__call__ = counting
    try:
        again = generate(pipe, prompts, save_to=tmp_path / "images", **args)
    finally:
        pipe.__class__.__call__ = original
    assert calls == [["a green diamond"]]  # only the missing batch is drawn again
    assert [im.tobytes() for im in again] == [im.tobytes() for im in first]
