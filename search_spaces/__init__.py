"""The built-in search spaces. pyproject.toml installs this directory as the package
``newllm.search_spaces``, so ``--space laptop`` finds its YAML file in an installed wheel as
well as in an editable checkout (see ``newllm.space.resolve_space``)."""
