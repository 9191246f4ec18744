"""What ``echoctl init`` writes for a new project: one app, one function, one channel.

Small enough to read in a minute, and every part is live under ``echoctl dev``: the page
publishes on ``greetings``, the ``hello`` function changes each message on its way, and
saving ``functions/hello/handler.py`` changes the next one.
"""

from __future__ import annotations

import json

APP = "hello"
CHANNEL = "greetings"

HANDLER = '''"""hello: runs on every message published to `greetings` (see associations.json).

Return the message (changed or not) to deliver it, or None to drop it. `print` goes to the
dev server's console. Save this file and the next message runs the new code.
"""


def handler(message, context):
    if isinstance(message, dict) and isinstance(message.get("text"), str):
        return {**message, "text": message["text"] + " 👋"}
    return message
'''

PAGE = '''<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>hello, Echo</title>
  <link rel="icon" href="data:,">
  <style>
    body { font: 16px system-ui, sans-serif; max-width: 36rem; margin: 2rem auto; padding: 0 1rem; }
    #log { list-style: none; padding: 0; } #log li { padding: .3rem 0; border-bottom: 1px solid #ddd; }
    #state { color: #666; font-size: .9rem; }
  </style>
</head>
<body>
  <h1>hello, Echo <span id="state">connecting…</span></h1>
  <form id="say"><input id="text" placeholder="Say hello" autocomplete="off" autofocus>
    <button>Send</button></form>
  <ul id="log"></ul>
  <script type="module">
    // The dev server hands out tokens at /dev/token; in production your backend mints them.
    import { Echo } from "/client/echo.js";
    const { jwt } = await (await fetch("/dev/token?app=hello")).json();
    const echo = new Echo({ host: location.origin, appName: "hello", jwt });
    const show = (text) => document.querySelector("#log")
      .prepend(Object.assign(document.createElement("li"), { textContent: text }));
    echo.addListener({
      message: ({ message }) => show(message.text),
      state: ({ state }) => { document.querySelector("#state").textContent = state; },
    });
    await echo.subscribe({ channels: ["greetings"] });
    document.querySelector("#say").addEventListener("submit", async (event) => {
      event.preventDefault();
      const input = document.querySelector("#text");
      await echo.publish({ channel: "greetings", message: { text: input.value } });
      input.value = "";
    });
  </script>
</body>
</html>
'''

ASSOCIATIONS = json.dumps({"applications": {APP: {"channels": [
    {"channelName": CHANNEL, "functionNames": ["hello"]}]}}}, indent=2) + "\n"

SETTINGS = """# Echo settings; ECHO_* environment variables override these.
port = 3000
max_message_bytes = 65536
"""

GITIGNORE = """# Echo's local state (last good function copies, caches)
.echo/
__pycache__/
node_modules/
"""

FILES: dict[str, str] = {
    "functions/hello/handler.py": HANDLER,
    "apps/hello/index.html": PAGE,
    "associations.json": ASSOCIATIONS,
    "echo.toml": SETTINGS,
    ".gitignore": GITIGNORE,
}
"""Path in the project -> content."""
