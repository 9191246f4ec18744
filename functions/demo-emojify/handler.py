"""demo-emojify: wrap the text in angry faces. "HELLO!!!" becomes "😠 HELLO!!! 😠"."""

FACE = "\N{ANGRY FACE}"


def transform(text):
    return f"{FACE} {text} {FACE}"


def handler(event, context):
    if isinstance(event, str):
        return transform(event)
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        return {**event, "text": transform(event["text"])}
    return event
