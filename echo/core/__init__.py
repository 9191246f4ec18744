"""Echo's server: the same code under ``echoctl dev`` and in a cloud deployment.

Nothing here imports ``echo.emulator`` or ``echo.targets``; runners and stores plug in.
"""
