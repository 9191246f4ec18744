"""The wire: Engine.IO v4 / Socket.IO v5 behind one interface (:mod:`echo.transport.base`)."""

TRANSPORTS = {
    "native": "echo.transport.native.server:NativeTransport",
    "python-socketio": "echo.transport.pysocketio:PySocketIOTransport",
}
"""The ``transport`` setting's values and the class each names (imported only when chosen)."""
