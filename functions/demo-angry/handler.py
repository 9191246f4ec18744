"""demo-angry: make the message shout. "hello" becomes "HELLO!!!"."""


def transform(text):
    return text.upper() + "!!!"


def handler(event, context):
    if isinstance(event, str):
        return transform(event)
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        return {**event, "text": transform(event["text"])}
    return event
