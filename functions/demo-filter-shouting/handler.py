"""demo-filter-shouting: a filter. Messages typed in all capitals are dropped (None)."""


def handler(event, context):
    text = event.get("text") if isinstance(event, dict) else event
    if isinstance(text, str) and len(text) > 3 and text.isupper():
        return None
    return event
