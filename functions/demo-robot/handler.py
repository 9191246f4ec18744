"""demo-robot: speak like a robot, each character as 8 binary digits. "hi" -> "01101000 01101001"."""


def to_binary(text):
    return " ".join(format(byte, "08b") for byte in text.encode("utf-8"))


def handler(event, context):
    if isinstance(event, str):
        return to_binary(event)
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        return {**event, "text": to_binary(event["text"])}
    return event
