"""bench-c: pass the message through unchanged (the bench's payload carries its send time)."""


def handler(event, context):
    return event
