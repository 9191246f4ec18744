"""``python -m echo`` is ``echoctl``."""

from echo.cli import main

main()
