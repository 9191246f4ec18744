"""Echo's benchmarks: Echo measured side by side with Node socket.io and python-socketio.

Run ``python -m bench --profile quick`` (under 2 minutes) or ``--profile full``; see
``bench/README.md``.
"""
