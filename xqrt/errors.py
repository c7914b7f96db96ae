"""The one exception type the command lines turn into a single error line."""


class XQError(Exception):
    """Bad input or an unsupported request: the message is meant for the user as it is."""
