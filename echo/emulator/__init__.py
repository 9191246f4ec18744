"""The local development loop: worker-process runner, hot reload, ``echoctl dev``."""
