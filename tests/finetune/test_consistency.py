"""Persona consistency: a classifier of the personas' own replies recognises their voices."""

from __future__ import annotations

import pytest

from finetune.consistency import PersonaClassifier, turns
from finetune.errors import DataError

HARUHI = [
    "阿虚！SOS团今天要去找外星人，不许迟到！",
    "无聊死了，普通的人类我才没兴趣呢。",
    "我是团长，团长的命令是绝对的！",
    "快点，我们要开会了，会议内容是寻找超能力者！",
    "哼，你这个杂务，还不快去准备！",
    "今天的不可思议探索活动，一定会有收获的！",
]
ATRI = [
    "我是高性能的嘛！",
    "好吃就是高兴嘛！螃蟹真好吃。",
    "夏生先生，ATRI会努力帮忙的哦。",
    "机器人也是有心的！",
    "高性能机器人ATRI，今天也在工作中。",
    "夏生先生又在偷懒了吗？",
]


@pytest.fixture(scope="module")
def classifier() -> PersonaClassifier:
    return PersonaClassifier().fit({"haruhi": HARUHI, "atri": ATRI})


def test_replies_in_a_personas_voice_are_recognised_as_theirs(classifier) -> None:  # type: ignore[no-untyped-def]
    haruhi = classifier.score("haruhi", ["SOS团的团长命令你，快去找外星人！", "普通的人类真无聊。"])
    atri = classifier.score("atri", ["ATRI是高性能的机器人嘛！", "夏生先生，螃蟹好吃！"])
    assert haruhi.recognised == 100.0 and atri.recognised == 100.0
    assert haruhi.own_probability > 50 and atri.own_probability > 50


def test_another_personas_voice_is_not_recognised(classifier) -> None:  # type: ignore[no-untyped-def]
    swapped = classifier.score("haruhi", ["ATRI是高性能的机器人嘛！", "好吃就是高兴嘛！"])
    assert swapped.recognised == 0.0
    assert swapped.own_probability < 50
    assert classifier.score("haruhi", []).replies == 0


def test_text_unlike_any_persona_is_recognised_as_none(classifier) -> None:  # type: ignore[no-untyped-def]
    # n-grams the classifier never saw give every persona the same probability: noise is not
    # credited to the persona with the most training replies
    noise = ["Лорем ипсум ₪₪ [24,483.483]", "", "zzzz qqqq"]
    for persona in ("haruhi", "atri"):
        result = classifier.score(persona, noise)
        assert result.recognised == 0.0
        assert result.own_probability == pytest.approx(50.0, abs=1.0)


def test_one_persona_is_not_enough_to_learn_from() -> None:
    with pytest.raises(DataError):
        PersonaClassifier().fit({"haruhi": HARUHI, "atri": ["", "  "]})
    with pytest.raises(DataError):
        PersonaClassifier().fit({"haruhi": HARUHI}).score("atri", ["你好"])


def test_turns_of_a_role() -> None:
    dialogue = [
        {"role": "system", "content": "你是凉宫春日。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "哼。"},
    ]
    assert turns([dialogue, dialogue[:2]], "assistant") == ["哼。"]
    assert turns([dialogue, dialogue[:2]], "user") == ["你好", "你好"]


KYON = [
    "阿虚: 「春日，你又想干什么？」",
    "阿虚: 「饶了我吧，我只想回家睡觉。」",
    "旁白: 「春日站在讲台上，大声宣布」",
    "阿虚: 「外星人什么的，怎么可能存在啊。」",
    "阿虚: 「你到底要去哪里？」",
    "古泉: 「真是有趣的发展呢。」",
]


def test_one_persona_and_the_other_speakers_are_enough() -> None:
    # one persona's dialogues give two classes: its replies and everyone else's turns; a reply
    # that echoes the user's side is then not credited to the persona
    classifier = PersonaClassifier().fit({"haruhi": HARUHI}, others=KYON)
    assert classifier.score("haruhi", ["团长的命令是绝对的！快去找外星人！"]).recognised == 100.0
    echo = classifier.score("haruhi", ["阿虚: 「饶了我吧，外星人什么的怎么可能。」"])
    assert echo.recognised == 0.0
    with pytest.raises(DataError):
        classifier.score("(other speakers)", ["你好"])
