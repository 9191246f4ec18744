"""The wire: Engine.IO v4 / Socket.IO v5 behind one interface (:mod:`echo.transport.base`)."""
