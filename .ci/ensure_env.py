"""Create/refresh the project's one virtualenv (.venv) and print nothing when it is current.

All tox envs run their commands with .venv's Python: torch alone is ~6 GB, so the
suite keeps ONE environment instead of one per tox env. tox's own envs stay empty
(skip_install) and cost nothing to switch. .venv is rebuilt only when missing, and
pip runs again only when pyproject.toml changed (a marker holds its hash).
"""

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

root = Path(__file__).resolve().parent.parent
env_dir = root / ".venv"
python = env_dir / "bin" / "python"
digest = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()
marker = env_dir / ".ssl-bench-installed"

if not python.exists():
    print(f"creating {env_dir} ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
if not marker.exists() or marker.read_text().strip() != digest:
    print("installing ssl-cluster-bench and its dependencies into .venv (first run: several minutes) ...",
          flush=True)
    subprocess.check_call([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    subprocess.check_call([str(python), "-m", "pip", "install", "--quiet", "-e", f"{root}[test]"])
    marker.write_text(digest + "\n")
