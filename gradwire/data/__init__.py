"""Training data that ships with every install: a character-level corpus built at run time from
the Python standard library's own source (``corpus``)."""
