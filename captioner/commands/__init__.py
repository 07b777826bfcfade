"""The ``captioner`` command line: ``main`` parses and dispatches; each command is a module here with
``add_parser(sub)`` and ``run(args)``, a thin shell over the library."""
