"""The associations document: validation that names the bad path, and matching rules."""

from __future__ import annotations

import pytest

from echo.core.associations import AssociationsError, parse_associations, parse_associations_text

pytestmark = pytest.mark.unit


def doc(*channels: dict) -> dict:
    return {"applications": {"app": {"channels": list(channels)}}}


def test_exact_beats_pattern_and_first_pattern_wins() -> None:
    associations = parse_associations(doc(
        {"channelName": "chat:*", "functionNames": ["general"]},
        {"channelName": "chat:vip*", "functionNames": ["vip"]},
        {"channelName": "chat:ops", "functionNames": ["ops"]},
        {"channelName": "news", "functionNames": []},
    ))
    def chain(app: str, channel: str) -> tuple[str, ...]:
        return associations.match(app, channel).functions

    assert chain("app", "chat:ops") == ("ops",)
    assert chain("app", "chat:vip-lounge") == ("general",)
    assert chain("app", "chat:") == ("general",)
    assert chain("app", "news") == ()
    # no accidental prefix or regex matching, as Ekko had
    assert chain("app", "newsroom") == ()
    assert chain("app", "xchat:1") == ()
    assert chain("other-app", "chat:1") == ()
    assert associations.function_names() == {"general", "vip", "ops"}


@pytest.mark.parametrize(
    ("document", "path", "problem"),
    [
        ([], "", "expected a JSON object"),
        ({}, "applications", "missing"),
        ({"applications": [], }, "applications", "expected an object of apps, got list"),
        ({"applications": {}, "extra": 1}, "extra", "unknown key"),
        ({"applications": {"a": 1}}, "applications.a", "expected an object"),
        ({"applications": {"a": {"channels": {}}}}, "applications.a.channels", "expected a list"),
        (doc("x"), "applications.app.channels[0]", "expected an object"),
        (doc({"functionNames": []}), "applications.app.channels[0].channelName", "non-empty"),
        (doc({"channelName": "c", "functionNames": "f"}),
         "applications.app.channels[0].functionNames", "expected a list"),
        (doc({"channelName": "c", "functionNames": ["ok", "bad name"]}),
         "applications.app.channels[0].functionNames[1]", "is not a function name"),
        (doc({"channelName": "c", "functionNames": []}, {"channelName": "c", "functionNames": []}),
         "applications.app.channels[1].channelName", "listed twice"),
        (doc({"channelName": "c", "ordered": "no"}), "applications.app.channels[0].ordered",
         "true or false"),
        (doc({"channelName": "c", "functions": []}), "applications.app.channels[0].functions",
         "unknown key"),
    ],
)
def test_invalid_documents_name_the_bad_path(document: object, path: str, problem: str) -> None:
    with pytest.raises(AssociationsError) as info:
        parse_associations(document)
    assert info.value.path == path
    assert problem in str(info.value)


def test_json_syntax_errors_give_line_and_column() -> None:
    with pytest.raises(AssociationsError, match=r"associations.json is not valid JSON \(line 2"):
        parse_associations_text('{"applications":\n  {,}}', source="associations.json")
    with pytest.raises(AssociationsError, match="not UTF-8"):
        parse_associations_text(b"{\"a\": \"\xc3\x28\"}", source="x")


def test_ordered_defaults_to_true_and_can_be_switched_off() -> None:
    associations = parse_associations(doc(
        {"channelName": "fast", "functionNames": ["f"], "ordered": False},
        {"channelName": "calm", "functionNames": ["f"]},
    ))
    assert associations.match("app", "fast").ordered is False
    assert associations.match("app", "calm").ordered is True
    assert associations.match("app", "unlisted").ordered is True
