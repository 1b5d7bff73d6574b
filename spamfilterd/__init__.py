"""spamfilterd: a GPT-2 spam classifier served as an SMTP proxy and a pipe filter."""

__all__ = ["SpamClassifier", "__version__"]


def __getattr__(name: str):
    # Lazy: `spamfilterd classify` as a thin client and config checks should not pay for
    # importing torch, nor for the package metadata lookup behind the version.
    if name == "SpamClassifier":
        from spamfilterd.classifier import SpamClassifier

        return SpamClassifier
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("spamfilterd")
        except PackageNotFoundError:  # running from a source tree that was never installed
            return "0.0.0+source"
    raise AttributeError(name)
