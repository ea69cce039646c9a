"""A user's own project, as tools/train and tfmp.app.flags meet it: models and data functions
in a package of its own (put on PYTHONPATH by the tests)."""
