"""What crosses nodes: one interface (:mod:`echo.broker.base`), memory and Redis behind it."""
