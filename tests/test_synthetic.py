import random

import pytest

from sparseforge.data import read_text
from sparseforge.data.synthetic import episodes, multikey_episode, passkey_episode


@pytest.fixture(scope="module")
def filler(tokenizer):
    return tokenizer(read_text("heldout")[:60000], add_special_tokens=False, verbose=False)["input_ids"]


@pytest.mark.parametrize("length", [128, 512, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_episode_layout(tokenizer, filler, length, depth):
    ep = passkey_episode(random.Random(3), tokenizer, filler, length, depth)
    assert len(ep.input_ids) == length and ep.answer_end == length
    text = tokenizer.decode(ep.input_ids)
    assert text.endswith(f"What is the pass key? The pass key is {ep.answer}")
    assert tokenizer.decode(ep.input_ids[ep.answer_start :]) == f" {ep.answer}"
    assert len(ep.answer) == 5 and ep.answer.isdigit()
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
    needle = enc(f"\nThe pass key is {ep.answer}. Remember it. {ep.answer} is the pass key.\n")
    n_filler = length - len(needle) - len(enc("\nWhat is the pass key? The pass key is")) - ep.answer_len
    cut = round(depth * n_filler)  # the needle sits exactly at the asked depth of the filler
    assert ep.input_ids[cut : cut + len(needle)] == needle


def test_multikey_episode_has_distractors(tokenizer, filler):
    ep = multikey_episode(random.Random(5), tokenizer, filler, 512, 0.25, n_keys=4)
    text = tokenizer.decode(ep.input_ids)
    assert len(ep.input_ids) == 512 and text.count("The value for key ") == 5  # four pairs and the question
    asked = text.rsplit("What is the value for key ", 1)[1].split("?")[0]
    assert f"The value for key {asked} is {ep.answer}." in text
    extra = multikey_episode(random.Random(5), tokenizer, filler, 512, 0.25, n_keys=4, extra_questions=3)
    assert len(extra.extra_answers) == 3 and extra.input_ids[:512] == ep.input_ids


def test_episodes_are_seeded(tokenizer):
    text = read_text("heldout")[:60000]
    a = episodes("passkey", tokenizer, text, [256], [0.0, 1.0], 3, seed=11)
    b = episodes("passkey", tokenizer, text, [256], [0.0, 1.0], 3, seed=11)
    c = episodes("passkey", tokenizer, text, [256], [0.0, 1.0], 3, seed=12)
    assert len(a) == 6 and [e.input_ids for e in a] == [e.input_ids for e in b]
    assert [e.input_ids for e in a] != [e.input_ids for e in c]
    with pytest.raises(ValueError, match="unknown retrieval task"):
        episodes("needle", tokenizer, text, [256], [0.0], 1)
    with pytest.raises(ValueError, match="too short"):
        episodes("passkey", tokenizer, text, [10], [0.0], 1)
