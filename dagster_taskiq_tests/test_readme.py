"""README.md stays true to the code: two commands first, complete reference tables, every flag."""

import re

import click
import pytest

from dagster_taskiq import tags
from dagster_taskiq.cli import main
from dagster_taskiq.config import KNOWN_SOURCE_OPTIONS
from dagster_taskiq.executor import executor_config_schema
from dagster_taskiq.launcher import TaskiqRunLauncher
from dagster_taskiq_tests.harness import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def _table_keys() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)`", README, re.M))


def test_it_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    assert first_block.group(1).split("\n")[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert README.index(first_block.group(0)) < README.index("\n## ")


def test_the_sections_other_helpers_rely_on_exist() -> None:
    for title in ("## Running the tests", "## Performance", "## Reliability"):
        assert re.search(rf"^{re.escape(title)}$", README, re.M), title
    running = README.split("## Running the tests", 1)[1]
    assert "bash scripts/test.sh" in running


def test_every_config_key_is_documented() -> None:
    documented = _table_keys()
    for key in executor_config_schema():
        assert key in documented, f"executor key {key} missing from README"
    for key in TaskiqRunLauncher.config_type():
        assert key in documented, f"launcher key {key} missing from README"
    for option in KNOWN_SOURCE_OPTIONS:
        assert option in documented, f"config_source option {option} missing from README"


def test_every_tag_is_documented() -> None:
    for name in (tags.QUEUE_TAG, tags.PRIORITY_TAG, tags.RUN_PRIORITY_TAG, tags.TASK_ID_TAG):
        assert f"| `{name}` |" in README, name
    for name in (tags.CELERY_QUEUE_TAG, tags.CELERY_PRIORITY_TAG, tags.CELERY_RUN_PRIORITY_TAG):
        assert name in README, name


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        if isinstance(command, click.Group):
            found += _commands(command, path)
        else:
            found.append((" ".join(path), command))
    return found


@pytest.mark.parametrize("path,command", _commands(main), ids=lambda v: str(v))
def test_every_cli_flag_is_documented(path: str, command: click.Command) -> None:
    assert f"dagster-taskiq {path}" in README, f"command {path} missing from README"
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        assert any(o in README for o in longs), f"{path}: {param.opts} missing from README"
