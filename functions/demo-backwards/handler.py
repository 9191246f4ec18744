"""demo-backwards: reverse the text. "hello" becomes "olleh"."""


def handler(event, context):
    if isinstance(event, str):
        return event[::-1]
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        return {**event, "text": event["text"][::-1]}
    return event
