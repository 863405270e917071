"""Every python/torchrun command in README.md parses with the real CLI parser (a renamed flag fails here)."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands():
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.strip())
                if words and words[0] in ("python", "torchrun"):
                    commands.append(words)
    return commands


def parser_for(words):
    """(parse function, argv) for a README command line."""
    if words[0] == "torchrun" or words[1] == "-m":
        i = words.index("-m")
        module, argv = words[i + 1], words[i + 2:]
    else:
        module, argv = words[1].removesuffix(".py").replace("/", "."), words[2:]
    if module == "pytest":
        return None, argv
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # `python -m package` runs package/__main__.py
        mod = importlib.import_module(module + ".__main__")
    if hasattr(mod, "STAGE"):
        from tinyllm_mcore.training.arguments import build_parser

        return build_parser(module, mod.STAGE.extra_args).parse_args, argv
    if hasattr(mod, "build_parser"):
        return mod.build_parser().parse_args, argv
    return mod.parse_args, argv


COMMANDS = readme_commands()


def test_readme_has_the_two_commands():
    joined = [" ".join(c) for c in COMMANDS]
    assert any("tinyllm_mcore.quickstart" in c for c in joined)
    assert any(c.startswith("python -m pytest") for c in joined)
    assert len(COMMANDS) >= 12


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(words):
    parse, argv = parser_for(words)
    if parse is None:
        return
    parse(argv)
