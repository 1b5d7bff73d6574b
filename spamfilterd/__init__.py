"""spamfilterd: a GPT-2 spam classifier served as an SMTP proxy and a pipe filter."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spamfilterd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["SpamClassifier", "__version__"]


def __getattr__(name: str):
    # Lazy: `spamfilterd --help` and config checks should not pay for importing torch.
    if name == "SpamClassifier":
        from spamfilterd.classifier import SpamClassifier

        return SpamClassifier
    raise AttributeError(name)
