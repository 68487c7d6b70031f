"""The CI rule, run on a small test file of its own: under CI=true a skip fails the run; without it (the
control, same file) the skip is only a skip."""

import os
import subprocess
import sys
import textwrap

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLE = textwrap.dedent("""
    import pytest

    def test_passes():
        assert True

    def test_skips():
        pytest.skip("qemu is not installed")

    @pytest.mark.skipif(True, reason="needs root")
    def test_skipped_by_marker():
        pass
""")
MODULE_SKIP = "import pytest\npytest.skip('no kernel package', allow_module_level=True)\n"


def _run(tmp_path, source: str, ci: str):
    path = tmp_path / "test_sample.py"
    path.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    env["PYTHONPATH"] = _REPO
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_skips", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(path)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_under_ci(tmp_path):
    out = _run(tmp_path, SAMPLE, "true")
    assert out.returncode == 1, out.stdout
    assert "1 failed, 1 passed, 1 error" in out.stdout, out.stdout  # a skip at setup reads as an error
    assert "qemu is not installed" in out.stdout and "Skipped: needs root" in out.stdout
    assert out.stdout.count("skipped under CI=true") >= 2


def test_a_skip_is_a_skip_without_ci(tmp_path):
    out = _run(tmp_path, SAMPLE, "")
    assert out.returncode == 0, out.stdout
    assert "1 passed, 2 skipped" in out.stdout, out.stdout


def test_a_module_skipped_at_import_fails_under_ci(tmp_path):
    assert _run(tmp_path, MODULE_SKIP, "").returncode == 5  # control: nothing ran, nothing failed
    out = _run(tmp_path, MODULE_SKIP, "true")
    assert out.returncode == 2 and "no kernel package" in out.stdout, out.stdout  # 2: collection failed
