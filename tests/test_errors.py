"""One home for flyer's errors: library code names fields, only the CLI words them as flags."""

import argparse
import pickle
import re
from pathlib import Path

import pytest

import flyer
from flyer import errors
from flyer.errors import ConfigError, FieldError

ROOT = Path(flyer.__file__).parent


def test_field_error_names_the_field():
    e = FieldError("gpus", "must be >= 1 (got 0)")
    assert isinstance(e, ConfigError) and isinstance(e, ValueError)
    assert e.field == "gpus" and str(e) == "gpus: must be >= 1 (got 0)"
    assert e.worded("--gpus") == "--gpus: must be >= 1 (got 0)"
    again = pickle.loads(pickle.dumps(e))  # crosses process boundaries (torchrun, multiprocessing)
    assert (again.field, str(again)) == (e.field, str(e))


def test_old_homes_reexport_the_one_class():
    from flyer.cli import UserError
    from flyer.config import ConfigError as config_error
    from flyer.data import DataError
    from flyer.data.errors import DataError as data_errors_error
    from flyer.train.checkpoint import CheckpointError
    from flyer.train.trainer import TrainingError

    assert UserError is errors.UserError and config_error is errors.ConfigError
    assert DataError is data_errors_error is errors.DataError and issubclass(DataError, ConfigError)
    assert CheckpointError is errors.CheckpointError and TrainingError is errors.TrainingError


def test_generation_config_names_the_field():
    from flyer.infer import GenerationConfig

    for kw, field in ((dict(top_p=0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(attention="flash"), "attention")):
        with pytest.raises(FieldError) as e:
            GenerationConfig(**kw).validate()
        assert e.value.field == field and str(e.value).startswith(f"{field}: ")


# library modules whose errors name fields; a flag ("--gpus") belongs to the CLI modules only
LIBRARY = [p for p in (*(ROOT / "cluster").glob("*.py"), *(ROOT / "infer").glob("*.py"),
                       *(ROOT / "data").glob("*.py"), ROOT / "config.py", ROOT / "model" / "counts.py")
           if p.name != "cli.py"]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_modules_name_no_flags(path):
    text = path.read_text()
    assert not re.search(r"""["']--[a-z]""", text), f"{path.name} words a flag; raise FieldError(field, ...)"
    assert "flyer.cli" not in text, f"{path.name} imports the CLI: layers import downward only"


def _options(parser: argparse.ArgumentParser, path=("flyer",)):
    """(command, action) of every option of ``parser`` and of its subcommands'."""
    for a in parser._actions:  # argparse has no public way to list a parser's options
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _options(sub, (*path, name))
        elif a.option_strings and a.dest != "help":
            yield " ".join(path), a, parser


def test_every_option_says_what_it_is_and_its_default():
    """``--help`` of every command describes each option and shows its default: argparse's where the flag has one,
    the config's where a flag defaults to None so that a config file can set it (``flyer train``: TrainConfig's)."""
    from flyer.cli import build_parser
    from flyer.train.config import TrainConfig

    options = list(_options(build_parser()))
    assert len(options) > 150 and not [f"{c} {a.option_strings[-1]}" for c, a, _ in options if not a.help]
    train = next(p for c, _, p in options if c == "flyer train")
    text = " ".join(train.format_help().split("options:", 1)[1].split())
    for flag, field in (("--lr LR", "lr"), ("--warmup WARMUP", "warmup"), ("--eval-every EVAL_EVERY", "eval_every"),
                        ("--keep KEEP", "keep"), ("--ckpt-every CKPT_EVERY", "ckpt_every")):
        assert f"(default: {getattr(TrainConfig, field)})" in text.split(flag, 1)[1].split(" --", 1)[0], flag
    serve = next(p for c, _, p in options if c == "flyer serve")
    port = " ".join(serve.format_help().split("options:", 1)[1].split()).split("--port PORT", 1)[1]
    assert "(default: 8000)" in port.split(" --", 1)[0]
