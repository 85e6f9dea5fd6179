"""The suite's own disk use: a full run writes gigabytes of checkpoints, which must not outlive the tests that wrote
them (kept to the end of the session, they filled a CI machine's disk), and the processes it starts write their
temporary files under the session's folder, not the machine's /tmp."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def test_a_passing_tests_files_go_when_it_ends(request):
    assert request.config.getini("tmp_path_retention_policy") == "failed"


def test_temporary_files_go_under_the_sessions_folder(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert not Path(tempfile.gettempdir()).is_relative_to(base)  # this process's: removed after pytest's cleanup
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True, env=os.environ)
    assert Path(child.stdout.strip()).is_relative_to(base)
