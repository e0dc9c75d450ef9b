"""The one exception type for unusable data, shared by every dataset loader."""


class DatasetError(RuntimeError):
    """The data at data.root cannot be used; the message says why and what to do.

    Raised before workers start (``TaskSpec.check_data``) and inside workers; the CLI prints it as one
    ``slowmo-train: error:`` line."""
