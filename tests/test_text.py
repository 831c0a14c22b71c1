"""Text side information: templates over atomic fields, Amazon quirks, fallbacks, clear errors."""
import pytest

from conftest import ML_TINY_YAML, tiny_config
from recbole_llm.config import Config
from recbole_llm.data.text import TextSideInformation, TextTemplate, clean_value, read_atomic_file
from recbole_llm.utils import create_dataset


def _side_info(dataset, **config_dict):
    config = Config(model="BPR", dataset=dataset, config_dict=config_dict)
    data = create_dataset(config)
    return TextSideInformation(config, data), data


def test_ml100k_item_1_is_toy_story_with_year_and_genres():
    side, data = _side_info("ml-100k")
    toy_story = data.token2id("item_id", "1")
    assert side.texts("item", "item_text_template")[toy_story] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert side.texts("item", "item_title_template")[toy_story] == "Toy Story (1995)"
    user = data.token2id("user_id", "1")
    assert side.texts("user", "user_text_template")[user] == "A 24-year-old man, occupation: technician, zip code 85711."


def test_texts_are_aligned_with_internal_ids_and_padding_is_empty():
    side, data = _side_info("ml-100k")
    texts = side.texts("item", "item_title_template")
    assert len(texts) == data.item_num and texts[0] == ""
    goldeneye = data.token2id("item_id", "2")
    assert texts[goldeneye] == "GoldenEye (1995)"


def test_amazon_sample_yields_text_for_every_item_with_quirks_resolved():
    side, data = _side_info("amazon-beauty-sample")
    texts = side.texts("item", "item_text_template")
    assert all(texts[1:]) and len(texts) == data.item_num
    joined = "\n".join(texts)
    assert "&amp;" not in joined and "&#39;" not in joined and "L'Oréal" in joined
    assert "Categories: Beauty, Skin Care" in joined and "'Beauty'" not in joined
    assert side.fallback_count == 0
    # an item with neither title nor categories still has its brand
    raw, _ = read_atomic_file(f"{side.config['data_path']}/amazon-beauty-sample.item")
    titleless = raw[(raw.title == "") & (raw.categories == "")].item_id.iloc[0]
    assert texts[data.token2id("item_id", titleless)].startswith("Brand: ")


def test_items_without_text_get_the_stated_fallback():
    side, data = _side_info("amazon-beauty-sample")
    titles = side.texts("item", "item_title_template")
    raw, _ = read_atomic_file(f"{side.config['data_path']}/amazon-beauty-sample.item")
    titleless = raw[raw.title == ""].item_id.tolist()
    assert titleless and side.fallback_count == len(titleless)
    for token in titleless:
        assert titles[data.token2id("item_id", token)] == f"item {token}"


def test_unknown_field_error_names_field_and_file():
    side, _ = _side_info("ml-100k", item_text_template="{movie_title} by {director}")
    with pytest.raises(KeyError, match=r"\['director'\].*ml-100k.item"):
        side.texts("item", "item_text_template")


def test_unset_and_empty_templates_are_refused():
    side, _ = _side_info("ml-100k", user_text_template=None)
    with pytest.raises(KeyError, match="user_text_template"):
        side.texts("user", "user_text_template")
    with pytest.raises(ValueError, match="non-empty"):
        TextTemplate("   ")
    with pytest.raises(ValueError, match="no field"):
        TextTemplate("just words")


def test_template_optional_segments_and_missing_values():
    template = TextTemplate("{a}[ ({b})][, c={c}]")
    assert template.render({"a": "x", "b": "y", "c": None}) == "x (y)"
    assert template.render({"a": None, "b": None, "c": "z"}, missing_value="?") == "?, c=z"
    assert template.is_empty_for({"a": None, "b": None, "c": None})


@pytest.mark.parametrize("raw, ftype, join, expected", [
    ("Animation Children's Comedy", "token_seq", ", ", "Animation, Children's, Comedy"),
    ("'Beauty', 'Skin Care', 'Face'", "token_seq", ", ", "Beauty, Skin Care, Face"),
    ("'Beauty', 'Beauty', \"Men's Care\"", "token_seq", " / ", "Beauty / Men's Care"),
    ("Rock &amp; Roll  Hall", "token", " ", "Rock & Roll Hall"),
    ("1995.0", "float", " ", "1995"),
    ("12.50", "float", " ", "12.5"),
    ("", "token", " ", None),
    ("nan", "float", " ", None),
])
def test_clean_value(raw, ftype, join, expected):
    assert clean_value(raw, ftype, " ", join) == expected


def test_value_map_and_fixture_templates():
    config = Config(model="BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config())
    data = create_dataset(config)
    users = TextSideInformation(config, data).texts("user", "user_text_template")
    assert any(" woman," in t for t in users) and any(" man," in t for t in users)
    assert not any(" F," in t or " M," in t for t in users)
