"""User-facing errors: one paragraph naming the file, the key and the fix; the CLI exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, file, model). Printed without a traceback; exit code 2."""

    exit_code = 2
