"""Echo's own Engine.IO v4 / Socket.IO v5 server (:class:`.server.NativeTransport`)."""
