"""The one check every "bad option" test makes: the CLI refuses in one line and writes nothing."""
import subprocess
import sys


def assert_convert_refuses(src, folder, args, message):
    """`llmpack convert SRC -o FOLDER/x.llmpack ARGS` exits non-zero with one stderr line containing
    `message`, no traceback, and leaves FOLDER empty (no output, no temporary)."""
    out = folder / "x.llmpack"
    r = subprocess.run([sys.executable, "-m", "llmpack", "convert", str(src), "-o", str(out), *args],
                       capture_output=True, text=True)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not list(folder.iterdir())
