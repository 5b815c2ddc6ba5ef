"""Prompt sets by name, read from local copies written here in their published formats (the
hub is unreachable from this machine), and from any text or Parquet file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smpo_core.errors import SmpoError
from smpo_core.prompts import HPDV2_STYLES, PROMPT_SETS, load_prompt_set
from smpo_core.worlds import builtins
from smpo_core.worlds.tiny import write_synthetic_pickapic


@pytest.fixture
def hpdv2(tmp_path):
    """The HPS v2 benchmark layout: benchmark/<style>.json, each a JSON list of prompts."""
    folder = tmp_path / "HPDv2" / "benchmark"
    folder.mkdir(parents=True)
    for style in HPDV2_STYLES:
        prompts = [f"{style} prompt {i}" for i in range(5)]
        (folder / f"{style}.json").write_text(json.dumps(prompts))
    return tmp_path / "HPDv2"


def test_hpdv2_test_reads_four_styles_in_published_order(hpdv2):
    prompts = load_prompt_set(f"hpdv2-test:{hpdv2}")
    assert len(prompts) == 20 and prompts.published_size == 3200
    assert prompts.prompts[:2] == ("anime prompt 0", "anime prompt 1")
    assert prompts.prompts[-1] == "photo prompt 4"
    assert prompts.style_counts() == {style: 5 for style in HPDV2_STYLES}
    assert prompts.indices == tuple(range(20))
    # Also from the benchmark folder itself.
    assert load_prompt_set(f"hpdv2-test:{hpdv2 / 'benchmark'}").prompts == prompts.prompts


def test_fewer_prompts_of_a_styled_set_take_the_first_of_each_style(hpdv2):
    prompts = load_prompt_set(f"hpdv2-test:{hpdv2}", num_prompts=6)
    # 6 over 4 styles: 2, 2, 1, 1; indices stay those of the whole set (seeds derive from them).
    assert prompts.prompts == ("anime prompt 0", "anime prompt 1", "concept-art prompt 0",
                               "concept-art prompt 1", "paintings prompt 0", "photo prompt 0")
    assert prompts.indices == (0, 1, 5, 6, 10, 15)
    assert prompts.styles == ("anime", "anime", "concept-art", "concept-art", "paintings",
                              "photo")


def test_partiprompts_from_the_published_tsv_keeps_every_row(tmp_path):
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\n"
                   "bond\tAbstract\tBasic\t\n"
                   "a cat\tAnimals\tBasic\tfirst\n"
                   "a cat\tAnimals\tBasic\tduplicate rows are part of the published set\n")
    prompts = load_prompt_set(f"partiprompts:{tsv}")
    assert prompts.prompts == ("bond", "a cat", "a cat")
    assert prompts.published_size == PROMPT_SETS["partiprompts"].size == 1632
    assert prompts.styles is None


def test_pickapic_test_unique_from_a_copy_in_the_hub_layout(tmp_path):
    write_synthetic_pickapic(tmp_path / "pickapic", num_pairs=12, split="test_unique")
    write_synthetic_pickapic(tmp_path / "pickapic", num_pairs=20, split="train")
    prompts = load_prompt_set(f"pickapic-test-unique:{tmp_path / 'pickapic'}")
    expected = [row for file in sorted((tmp_path / "pickapic" / "data")
                                       .glob("test_unique-*.parquet"))
                for row in pq.read_table(file).column("caption").to_pylist()]
    assert list(prompts.prompts) == expected  # test_unique only, the train split left alone
    assert prompts.published_size == 500


def test_any_text_json_or_parquet_file_keeps_distinct_prompts(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\na dog\na cat\na bird\n")
    assert load_prompt_set(str(text)).prompts == ("a cat", "a dog", "a bird")
    parti = tmp_path / "parti.parquet"
    pq.write_table(pa.table({"Prompt": ["x", "y", "x"], "Category": ["a", "b", "c"]}), parti)
    assert load_prompt_set(str(parti)).prompts == ("x", "y")
    styled = tmp_path / "styled.json"
    styled.write_text(json.dumps([{"prompt": "p", "style": "photo"},
                                  {"prompt": "q", "style": "anime"}]))
    assert load_prompt_set(str(styled)).styles == ("photo", "anime")
    tiny_file = builtins.resolve("builtin:tiny-prompts", tmp_path / "store")
    tiny = load_prompt_set(tiny_file, 6)
    assert len(tiny) == 6 and tiny == load_prompt_set(tiny_file, 6)
    assert set(tiny.styles) == {"one shape", "two shapes"}


def test_bad_prompt_sets_are_one_line_naming_what_was_expected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SmpoError, match=r"evaluate.prompts '.*empty.txt': no prompts found"):
        load_prompt_set(str(empty))
    with pytest.raises(SmpoError, match="no such file, and not a named set; expected one of "
                                        "pickapic-test-unique, partiprompts, hpdv2-test"):
        load_prompt_set(str(tmp_path / "missing.txt"))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"other": ["x"]}), table)
    with pytest.raises(SmpoError, match="has none of the columns caption, prompt"):
        load_prompt_set(str(table))
    (tmp_path / "hpd").mkdir()
    (tmp_path / "hpd" / "anime.json").write_text("[]")
    with pytest.raises(SmpoError, match=r"lacks concept-art\.json"):
        load_prompt_set(f"hpdv2-test:{tmp_path / 'hpd'}")


def test_an_unreachable_hub_names_the_local_copy_to_give_instead():
    with pytest.raises(SmpoError) as error:
        load_prompt_set("hpdv2-test")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("evaluate.prompts: could not read HPDv2 test")
    assert "evaluate.prompts=hpdv2-test:PATH with a folder with the HPS v2 benchmark files" \
        in message
