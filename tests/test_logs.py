"""Quiet logs: other libraries' INFO lines only with ``--verbosity``; the project's own lines always."""

import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import logging, sys
    from absl import app
    from mora_jax import logs
    from mora_jax.checkpoint.checkpointer import Checkpointer

    def main(argv):
        logs.apply_verbosity_flag()
        Checkpointer(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "{directory}").close()
        logging.getLogger("mora_jax.test").info("OWN-INFO-LINE")
        logging.getLogger("orbax").warning("THIRD-PARTY-WARNING")

    app.run(main)
""")


def _run(tmp_path, *flags):
    program = PROGRAM.replace("{directory}", str(tmp_path / "ckpt"))
    out = subprocess.run([sys.executable, "-c", program, *flags], capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


@pytest.mark.parametrize("flags, third_party_info", [((), False), (("--verbosity=0",), True)])
def test_third_party_info_only_with_verbosity(tmp_path, flags, third_party_info):
    text = _run(tmp_path, *flags)
    assert ("CheckpointManager created" in text) == third_party_info, text[-3000:]
    assert "OWN-INFO-LINE" in text  # the project's own INFO lines stay
    assert "THIRD-PARTY-WARNING" in text  # warnings are never hidden
