"""One home for flyer's errors: library code names fields, only the CLI words them as flags."""

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
