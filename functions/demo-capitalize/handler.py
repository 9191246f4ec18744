"""demo-capitalize: capitalize each word. "hello there" becomes "Hello There"."""


def transform(text):
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


def handler(event, context):
    if isinstance(event, str):
        return transform(event)
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        return {**event, "text": transform(event["text"])}
    return event
