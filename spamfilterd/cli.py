"""The `spamfilterd` command: one click group, each sub-command lives in the module that does its job."""

import click

from spamfilterd import __version__
from spamfilterd.pipe import check_config, classify
from spamfilterd.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spamfilterd")
def main() -> None:
    """GPT-2 spam filter for mail and SMS: pipe filter (`classify`) and SMTP proxy (`serve`)."""


main.add_command(classify)
main.add_command(check_config)
main.add_command(serve)

if __name__ == "__main__":
    main()
