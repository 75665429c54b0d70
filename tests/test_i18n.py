"""The web UI's two languages: every key in both, and the browser's language picked from Accept-Language."""

from __future__ import annotations

import string
from types import SimpleNamespace

import pytest

from zstudio.server.i18n import TEXTS, language, text


def test_every_text_has_both_languages_with_the_same_placeholders():
    for key, (english, chinese) in TEXTS.items():
        assert english and chinese, key
        fields = [{name for _, name, _, _ in string.Formatter().parse(t) if name} for t in (english, chinese)]
        assert fields[0] == fields[1], key


@pytest.mark.parametrize(
    ("header", "lang"),
    [("zh-CN,zh;q=0.9,en;q=0.8", "zh"), ("en-US,en;q=0.9,zh;q=0.5", "en"), ("fr-FR,zh-TW;q=0.7", "zh"),
     ("fr-FR", "en"), ("", "en")],
)  # fmt: skip
def test_language_follows_the_browsers_first_known_choice(header, lang):
    assert language(SimpleNamespace(headers={"accept-language": header})) == lang


def test_server_side_text_is_filled_in_each_language():
    assert text("en", "step", step=3, total=8) == "Step 3 of 8"
    assert text("zh", "step", step=3, total=8) == "第 3 步，共 8 步"


def test_ui_errors_say_what_happened_in_the_language_then_the_engines_line():
    from zstudio.params import ParamError
    from zstudio.server.ui import error_message

    err = ParamError("width", "1000 is not a multiple of 16; use 992 or 1008")
    assert error_message("zh", err) == "输入有误：width: 1000 is not a multiple of 16; use 992 or 1008"
    assert error_message("en", err).startswith("Invalid input: width: 1000")
