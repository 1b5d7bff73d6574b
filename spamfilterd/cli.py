"""The `spamfilterd` command: one click group, each sub-command lives in the module that does its job.

Sub-commands are imported only when run: `spamfilterd classify` as a thin client must start in
milliseconds, without the SMTP proxy's imports (or the package version lookup) of `serve`.
"""

import importlib

import click

_COMMANDS = {
    "classify": "spamfilterd.pipe:classify",
    "check-config": "spamfilterd.pipe:check_config",
    "serve": "spamfilterd.serve:serve",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module, _, attribute = _COMMANDS[cmd_name].partition(":")
        return getattr(importlib.import_module(module), attribute)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from spamfilterd import __version__

        click.echo(f"spamfilterd, version {__version__}")
        ctx.exit()


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version.",
)
def main() -> None:
    """GPT-2 spam filter for mail and SMS: pipe filter (`classify`), SMTP proxy and spamd door (`serve`)."""


if __name__ == "__main__":
    main()
