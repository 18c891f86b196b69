"""The command layer: each module here parses one group of commands' arguments and calls the
library (stages, tools, the demo). Nothing below imports it; ``fastgpt.cli`` dispatches to it.

Modules import only argparse-level code at the top, so building a parser (and ``--help``) never
loads torch; the work a command does is imported inside its ``run_<name>`` function.
"""
