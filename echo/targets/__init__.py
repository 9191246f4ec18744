"""Deploy targets: plugins that stand Echo up somewhere (Docker, AWS, ...)."""
