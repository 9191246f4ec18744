"""The AWS target: ``echoctl deploy --target aws`` stands the whole system up in one stack.

See the README's "Deploy to AWS" and :mod:`echo.targets.aws.target`.
"""

from echo.targets.aws.target import AwsTarget

__all__ = ["AwsTarget"]
