"""Checks on a finished CLI process (subprocess.CompletedProcess) that every fault test shares."""


def one_error_line(proc, *fragments) -> str:
    """The process failed the project's way: non-zero exit, no traceback, exactly one `error:` line on stderr, and
    that line holds every fragment. Returns the line."""
    assert proc.returncode not in (0, None), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
